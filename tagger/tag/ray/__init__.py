"""``tagger tag --engine ray``: the same tag job on Ray Data, for catalogs that outgrow one machine.

Only the tagging of the pending shards changes engine; everything around it is the local engine's own code
(:class:`tagger.tag.runner.TagRunner`): the manifest check, the bundle check, the lease, the plan and its
shards, ``--since``, the run summary, the error-rate gate and ``_SUCCESS``.

- :mod:`.cluster`: start a local Ray or join one (``--ray-address``, ``RAY_ADDRESS``), and the device the
  model actors get: GPUs of the cluster, checked up front (``--device cuda`` on a cluster without one fails
  at once instead of waiting for ever);
- :mod:`.stages`: the CPU decode stage (the project's one decode path, every failure a typed error row) and
  the model actor (one :class:`tagger.model.predictor.Predictor` per actor, batched, one row out per row in);
- :mod:`.sink`: the Datasink: workers write attempt-scoped fragments, only the driver publishes shards
  through :class:`tagger.tag.shards.ShardCommitter`, rows of retried or duplicated tasks are dropped;
- :mod:`.engine`: the Ray Data pipeline of one run, and its failures turned into the job's exit codes.

Nothing here imports ``ray`` at module level except the modules that only run on the ray branch; importing
this package (or ``jobs.cli``) does not import Ray.
"""

from __future__ import annotations

import importlib.util

# The pin of the `ray` extra (setup.cfg), named in the message of a missing install.
RAY_EXTRA = "pip install '.[ray]'  (or: pip install 'fashion-tagger[ray]')"


class RayEngineError(RuntimeError):
    """The Ray engine cannot run: no GPU for ``--device cuda``, the cluster cannot be reached, a task failed."""


def ray_missing() -> str:
    """Why ``--engine ray`` cannot run in this environment, or "" when Ray Data is installed (nothing imported)."""
    missing = [name for name in ("ray", "pandas") if importlib.util.find_spec(name) is None]
    if not missing:
        return ""
    return (f"--engine ray needs Ray Data, which is not installed here (missing: {', '.join(missing)}); "
            f"install the extra: {RAY_EXTRA}")
