"""The toy world's build (SFT -> MC labels -> PRM) and evaluation, kept out of `jobs/` so a job stays a thin CLI."""
