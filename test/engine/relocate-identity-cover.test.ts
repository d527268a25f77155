/**
 * planIdentity trusts the source's relocatable units only when every data byte of the mapping belongs
 * to exactly one unit that says the same host (identity.ts requireUnitsCover): a unit that disagrees,
 * a data run no unit covers, or two units over the same bytes is a bug in a driver, refused before
 * anything is planned.
 */
import { describe, expect, it } from 'vitest';
import type { SourceImage, TargetPlan } from '../../src/driver.js';
import { planIdentity } from '../../src/engine/identity.js';
import { ExtentMap } from '../../src/extent-map.js';
import { HostSpace } from '../../src/host-space.js';

const CS = 65536;

/** A source with 8 clusters of data, guest g at host (g + 2) · CS (behind a 2-cluster header), units as given. */
async function plan(units: { guest: number; host: number }[]) {
  const map = new ExtentMap(8 * CS);
  map.push({ guest: 0, length: 3 * CS, kind: 'data', host: 2 * CS });
  map.push({ guest: 3 * CS, length: CS, kind: 'zero' });
  map.push({ guest: 4 * CS, length: 4 * CS, kind: 'data', host: 6 * CS });
  const space = new HostSpace('test', 10 * CS);
  space.add(0, 2 * CS, 'header', 'header');
  space.addMapping(map);
  const source = {
    format: 'test',
    relocationAlignment: CS,
    relocatable: async () => units.map((u) => ({ ...u, length: CS, level: 0, pointer: { offset: 0, encode: () => new Uint8Array(8) } })),
  } as unknown as SourceImage;
  const target = { fixedRegions: [] } as unknown as TargetPlan;
  return planIdentity(source, map, space, 10 * CS, target, 'raw');
}

const good = [0, 1, 2, 4, 5, 6, 7].map((g) => ({ guest: g * CS, host: (g + 2) * CS }));

describe('planIdentity: the units must cover the data exactly', () => {
  it('accepts units that match the mapping, in any order', async () => {
    const p = await plan(good.slice().reverse());
    expect(p.units.length).toBe(7);
    // Guest 0 and 1 lie under the header, which stays: they are parked, their bytes go into the commit record.
    expect(p.relocation.placed.length).toBe(5);
    expect(p.relocation.parked.length).toBe(2);
  });
  it('refuses a unit whose host disagrees with the mapping', async () => {
    const bad = good.map((u, i) => (i === 4 ? { ...u, host: u.host + 512 } : u));
    await expect(plan(bad)).rejects.toThrow(/unit guest 327680 at 459264 disagrees with the mapping \(data at 458752\)/);
  });
  it('refuses a unit over zeros', async () => {
    await expect(plan([...good, { guest: 3 * CS, host: 5 * CS }])).rejects.toThrow(/disagrees with the mapping \(zero at undefined\)/);
  });
  it('refuses data no unit covers, and two units over the same bytes', async () => {
    await expect(plan(good.slice(1))).rejects.toThrow(/units cover 393216 of 458752 data bytes/);
    await expect(plan([...good, good[2]!])).rejects.toThrow(/units cover 524288 of 458752 data bytes/);
  });
});
