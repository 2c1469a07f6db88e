"""The layer above the processes: the `pagedserve` CLI, the launcher (`serve`), `LocalServer`, the
offline `LLM`, `run-batch`, `bench` and the model fetcher. No process (router, scheduler, worker)
imports this package; they import only the ground below it (`pagedserve.v1`, `flags`, `parent_watch`,
`sampling_ranges`), which imports nothing above it (pyproject's import-linter contracts).
"""
