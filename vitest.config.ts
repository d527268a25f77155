import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts', 'test/**/*.test.tsx'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Two cores: forks keep memory per test file isolated.
    pool: 'forks',
    reporters: ['default', './test/support/count-reporter.ts'],
  },
});
