"""External peers: other people's caching methods, run on the same DiT in the same harness.

Spec: ``shared/docs/tokencache.md`` section 4. TokenCache (``tclab.cache.hooks``) is tclab's own
engine; this package runs the *published* implementations of competing methods, unmodified, so a
benchmark compares against the code their authors ship rather than a re-implementation. One file
each:

- ``fbcache.py``: First-Block Cache (ParaAttention; diffusers ``FirstBlockCacheConfig``). Skips every
  block but the first in steps where block 0's residual barely changed.
- ``taylorseer.py``: TaylorSeer (arXiv 2503.06923; diffusers ``TaylorSeerCacheConfig``). In forecast
  steps, every block's attention and MLP outputs are extrapolated with a Taylor series.
- ``pab.py``: Pyramid Attention Broadcast (arXiv 2408.12588; diffusers
  ``PyramidAttentionBroadcastConfig``). In broadcast steps, every block's self-attention reuses its
  last output.
- ``dbcache.py``: DBCache (cache-dit, ``cache_dit.enable_cache``; optional: ``pip install --no-deps
  cache-dit==1.5.3``). Skips the middle blocks in steps where the first ``Fn`` blocks' residual
  barely changed; the last ``Bn`` blocks always run.

and ``base.py``: the handle every peer shares (``PeerHandle``, ``DiffusersPeer``), the cache context,
the shared checks and the registry (``register_peer``).

One interface::

    >>> from tclab.cache.peers import apply_peer, peer_status
    >>> peer_status(model)                        # {"fbcache": "ok", ..., "dbcache": "cache-dit is not installed ..."}
    >>> handle = apply_peer("fbcache", model, threshold=0.1)
    >>> sample(model, labels, SampleConfig(num_steps=50))     # or model.pipeline()(class_labels=labels)
    >>> handle.stats()                            # tclab.cache.methods.STATS_KEYS, then the peer's own counts
    >>> handle.remove()                           # the transformer is exactly as before

or, like every caching method, ``tclab.cache.apply_caching(model, FirstBlockCachePeerConfig(threshold=0.1))``.
``model`` is a ``LoadedDiT`` or a bare ``DiTTransformer2DModel``.

**Adding a peer** is one file plus its registration: a config dataclass whose docstring is the
knob's manual, a ``PeerHandle`` subclass (``DiffusersPeer`` for diffusers hooks) whose ``_install``
registers the hooks and records them in ``_hooks``, and ``register_peer(name, Config, Handle,
requirement=..., model_requirement=...)``. The name is then in ``PEERS`` (after the built-ins, in
registration order), ``peer_status``, ``apply_peer``, ``peer_config`` and ``apply_caching``; every
sweep's reference points (``tclab.ablation.DEFAULT_PEERS``) include it. ``tests/test_methods.py``
defines one inside a test.

**The context tclab supplies.** diffusers' cache hooks keep their state in ``StateManager`` objects
that refuse to work without a *cache context*: pipelines whose transformer has ``CacheMixin`` wrap
each denoiser call in ``with transformer.cache_context("cond"):``. ``DiTTransformer2DModel`` has no
``CacheMixin`` and ``DiTPipeline`` enters no context, so the hooks alone raise "No cache context is
set". The peer therefore registers one more hook, ``PEER_CONTEXT_HOOK``, on the transformer itself
(outermost, so it runs whoever calls the model). Around every transformer call it:

1. decides whether this call starts a new sampling run. Inside ``tclab.sampling.sample`` the
   ``StepContext`` says so (a new ``run_id``; every batch chunk is its own run). Inside diffusers'
   ``DiTPipeline`` there is no context: ``tclab.steps.StepTracker`` recognises runs and CFG batches
   from the calls, by the one rule all of tclab uses (see ``tclab.steps``). ``handle.reset()`` forces
   one. On a new run it resets the peer's state (``reset_state`` of each of its hooks, or cache-dit's
   ``refresh_context``): what diffusers' pipelines get at the end of a call from
   ``maybe_free_model_hooks`` -> ``_reset_stateful_cache``, a ``CacheMixin`` method DiT lacks;
2. sets a ``CacheContext`` on the peer's ``StateManager``\\ s: name ``"cond_uncond"`` for a CFG batch
   (``[cond; uncond]`` rows in one forward, diffusers' name for batched CFG, e.g. the LTX pipelines)
   and ``"cond"`` without CFG, plus the step index, number of steps (when known) and timestep;
3. publishes the timestep to PAB's ``current_timestep_callback`` (which pipelines get from
   ``pipe.current_timestep``; DiTPipeline has none);
4. clears the context when the call returns (or raises).

Because both CFG halves run in one forward, a peer's skip decision covers the whole batch: e.g.
FBCache compares the mean residual change over all rows, cond and uncond together.

**What each hook needs from the DiT, checked.** First-block cache finds the block list by name
(``transformer_blocks`` is among diffusers' identifiers), needs at least 2 blocks (head and tail),
and looks up the block class in ``TransformerBlockRegistry``: ``BasicTransformerBlock`` is registered
as returning a single tensor (``return_hidden_states_index=0``, no encoder states), which the hook
supports. TaylorSeer's default patterns (``^transformer_blocks.*attn``, matched with ``re.fullmatch``)
match *nothing* in a DiT (the module is ``transformer_blocks.0.attn1``), so tclab passes explicit
patterns for ``attn1`` and ``ff``; its ``use_lite_mode`` is refused (see ``TaylorSeerPeerConfig``).
PAB hooks every ``Attention`` whose name contains ``transformer_blocks``: DiT's ``attn1``
(self-attention; DiT has no cross or temporal attention). cache-dit ships a DiT adapter with a patch
functor (DiT's forward reads ``transformer_blocks[0].norm1.emb`` *after* the loop, which cache-dit's
block wrapper would hide); tclab uses cache-dit's transformer-only path (a persistent context that
tclab refreshes per run) rather than its pipeline path, because the latter replaces
``DiTPipeline.__call__`` *on the class* (every DiTPipeline in the process) and never resets the
cache for tclab's own sampler, which calls the transformer directly.

**Removal restores exactly.** ``remove()`` removes every hook by name, undoes cache-dit's patch
functor (which ``cache_dit.disable_cache`` leaves in place), and deletes the hook registries and
``forward`` attributes this peer created, so the module tree, its attributes and its outputs are
bit-identical to before (``tests/test_peers.py`` checks all three).

Importing the package imports no diffusers hook machinery and no optional package: each peer
imports what it runs when it is applied.
"""

from __future__ import annotations

from .base import (PEER_CONTEXT_HOOK, PEERS, DiffusersPeer, PeerHandle, PeerSpec, PeerUnavailableError, apply_peer,
                   peer_config, peer_label, peer_names, peer_status, register_peer, unregister_peer)

# The built-in peers register in this order, which is the order of PEERS and peer_status.
from .fbcache import FirstBlockCachePeer, FirstBlockCachePeerConfig, apply_fbcache  # isort: skip
from .taylorseer import TaylorSeerPeer, TaylorSeerPeerConfig, apply_taylorseer  # isort: skip
from .pab import PyramidAttentionBroadcastPeer, PyramidAttentionBroadcastPeerConfig, apply_pab  # isort: skip
from .dbcache import CACHE_DIT_TESTED_VERSION, DBCachePeer, DBCachePeerConfig, apply_dbcache  # isort: skip

__all__ = [
    "PEERS", "PEER_CONTEXT_HOOK", "CACHE_DIT_TESTED_VERSION", "PeerHandle", "DiffusersPeer", "PeerSpec",
    "PeerUnavailableError", "apply_peer", "peer_status", "peer_config", "peer_names", "peer_label", "register_peer",
    "unregister_peer", "apply_fbcache", "apply_taylorseer", "apply_pab", "apply_dbcache", "FirstBlockCachePeerConfig",
    "TaylorSeerPeerConfig", "PyramidAttentionBroadcastPeerConfig", "DBCachePeerConfig",
    "FirstBlockCachePeer", "TaylorSeerPeer", "PyramidAttentionBroadcastPeer", "DBCachePeer",
]
