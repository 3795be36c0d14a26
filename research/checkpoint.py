"""Orbax checkpoints of the train state in `WORKDIR/checkpoints/STEP`.

The data order is a pure function of (seed, step), so the step stored in the state is the
whole data position: restoring a checkpoint resumes training exactly where it stopped.
Saves are asynchronous (training continues while the state is written) and only complete
checkpoints are ever listed by the manager.
"""
import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int, save_every: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """Returns (state, step) from the newest checkpoint, or (None, None) when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None, None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  try:
    state = mngr.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f'Could not restore checkpoint {mngr.directory}/{step} into the state this config '
        f'builds ({type(e).__name__}: {str(e)[:500]}). If the model or optimizer changed, use a '
        f'new --workdir; if the checkpoint is damaged, move {mngr.directory}/{step} aside to '
        'resume from the one before.') from e
  return state, step
