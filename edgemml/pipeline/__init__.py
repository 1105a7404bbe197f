"""The runner layer: what turns a pipeline file into a run folder.

* `loader` reads and checks a pipeline file (stage configs from the stage registry, sweeps expanded);
* `runner` runs it: stage order, fingerprints (`fingerprint`), the cache, resume, and the records
  each stage leaves (`runrecords`);
* `schema` describes the pipeline file for `edgemml schema` / `edgemml stages`.

It sits above the stage layer (it imports `edgemml.stages`) and below the CLI; nothing under it
imports it. `Runner` is re-exported, lazily: `edgemml check` needs the loader, not the runner.
"""

from typing import Any

__all__ = ["Runner"]


def __getattr__(name: str) -> Any:
    if name == "Runner":
        from edgemml.pipeline.runner import Runner

        return Runner
    raise AttributeError(f"module 'edgemml.pipeline' has no attribute {name!r}")
