"""A stage: one llama.cpp model + context running layers [first, end) of a model.

The first stage takes token ids; the others take hidden states (the residual stream after the
previous stage's last layer). A stage that is not last gives hidden states out, captured from
the graph tensor `l_out-{n-1}` by llama.cpp's eval callback, which also stops the graph there
(the final norm and output matrix are the next stages' business). The last stage gives logits
and samples with llama.cpp's sampler chain.

Each session owns one llama.cpp sequence (its own KV cache). `forward` is blocking and heavy; it
runs on the process's one compute thread (meshchat.engine.compute), so async callers await
`compute.run(stage.forward, ...)`. A lock keeps the other calls one at a time per stage.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import llama_cpp
import numpy as np
import numpy.typing as npt

from meshchat.engine import compute
from meshchat.engine.llama_lib import captured_log, ggml_base, init_backend
from meshchat.engine.profile import EngineProfile, flash_attn_type, model_params
from meshchat.engine.sampling import SamplerChain, SamplingParams
from meshchat.engine.stage_memory import StageMemory, from_log
from meshchat.errors import MeshchatError
from meshchat.model.slices import LayerRange

FloatArray = npt.NDArray[np.float32]


class StageError(MeshchatError):
    """A stage could not do what was asked (load, decode, unknown session...)."""


class ContextOverflowError(StageError):
    """A session's tokens no longer fit in its context window."""


class NoFreeSessionError(StageError):
    """Every session slot of the stage is taken."""


@dataclass(frozen=True)
class StageOptions:
    n_ctx: int = 4096  # context window of each session
    max_sessions: int = 4
    n_batch: int = 512  # most tokens in one llama_decode call; longer inputs go in chunks
    n_threads: int = 2
    use_mmap: bool = True
    # The engine profile's switches (meshchat.engine.profile): the safe values by default;
    # callers take them from the profile measured on this machine (`with_profile`).
    flash_attn: bool = False
    extra_bufts: bool = False

    @property
    def profile(self) -> EngineProfile:
        return EngineProfile(self.flash_attn, self.extra_bufts, self.n_threads)

    def with_profile(self, profile: EngineProfile) -> StageOptions:
        return replace(
            self,
            flash_attn=profile.flash_attn,
            extra_bufts=profile.extra_bufts,
            n_threads=profile.threads,
        )


@dataclass
class StageTimings:
    """Where a stage's time went, for benchmarks and the per-stage share in the UI."""

    compute_s: float = 0.0
    tokens: int = 0
    calls: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        self.compute_s += seconds
        self.tokens += tokens
        self.calls += 1


@dataclass
class _Session:
    slot: int
    tokens: list[int] = field(default_factory=list)  # every token in this session's KV, in order
    sampler: SamplerChain | None = None
    sampled: tuple[int, int] | None = None  # (position, token) the sampler already accepted


@dataclass
class StageOutput:
    """What a forward pass gives: hidden states (not last) or logits and a token (last)."""

    hidden: FloatArray | None = None  # [n_tokens, n_embd] float32
    logits: FloatArray | None = None  # [n_rows, n_vocab]: last token only, or all if asked
    token: int | None = None  # sampled token (last stage, when sampling was asked)


class Stage:
    def __init__(
        self,
        model_path: Path,
        layers: LayerRange,
        total_layers: int,
        options: StageOptions | None = None,
    ) -> None:
        init_backend()
        self.layers = layers
        self.total_layers = total_layers
        self.options = options or StageOptions()
        self.is_first = layers.first == 0
        self.is_last = layers.end == total_layers
        self.timings = StageTimings()
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._free_slots = list(range(self.options.max_sessions))[::-1]
        with captured_log() as allocations:
            self._model = self._load_model(model_path)
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.n_vocab = int(
            llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        )
        n_layers = int(llama_cpp.llama_model_n_layer(self._model))
        if n_layers != layers.count:
            raise StageError(f"{model_path} holds {n_layers} layers, expected {layers.count}")
        self._target = f"l_out-{layers.count - 1}".encode()
        self._hidden_out = np.empty((self.options.n_batch, self.n_embd), dtype=np.float32)
        self._captured_rows = 0
        # Keep the callback object alive as long as the context: C holds only its address.
        self._eval_callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)
        with captured_log() as context_allocations:
            self._ctx = self._new_context()
        self._batch = self._new_batch()
        # What llama.cpp allocated (meshchat.engine.stage_memory); a stage that passes hidden
        # states on flags every row as output, so its output buffer grows to n_batch rows.
        measured = from_log(allocations + context_allocations)
        peak_rows = self.options.n_batch if not self.is_last else 0
        self.memory: StageMemory = measured.with_output_peak(peak_rows * self.n_vocab * 4)

    # -- setup -------------------------------------------------------------------------------

    def _load_model(self, path: Path) -> ctypes.c_void_p:
        params = model_params(self.options.profile, self.options.use_mmap)
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise StageError(f"llama.cpp could not load {path} (run with --debug for its log)")
        return model

    def _new_context(self) -> ctypes.c_void_p:
        opts = self.options
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = opts.n_ctx * opts.max_sessions
        params.n_batch = opts.n_batch
        params.n_ubatch = opts.n_batch
        params.n_seq_max = opts.max_sessions
        params.kv_unified = False  # each session gets its own n_ctx cells
        params.n_threads = opts.n_threads
        params.n_threads_batch = opts.n_threads
        params.no_perf = True
        params.flash_attn_type = flash_attn_type(opts.flash_attn)
        if not self.is_last:
            params.cb_eval = self._eval_callback
            params.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise StageError("llama.cpp could not create a context (out of memory?)")
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(ctx))
        return ctx

    def _new_batch(self) -> llama_cpp.llama_batch:
        n = self.options.n_batch
        batch = llama_cpp.llama_batch_init(n, 0 if self.is_first else self.n_embd, 1)
        # numpy views over the batch's C arrays, so filling a batch costs no Python loops.
        self._batch_pos = np.ctypeslib.as_array(batch.pos, shape=(n,))
        self._batch_logits = np.ctypeslib.as_array(batch.logits, shape=(n,))
        self._batch_n_seq = np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))
        self._batch_n_seq[:] = 1
        self._batch_seq = [batch.seq_id[i] for i in range(n)]
        self._batch_slot = -1
        if self.is_first:
            self._batch_tokens = np.ctypeslib.as_array(batch.token, shape=(n,))
        else:
            self._batch_embd = np.ctypeslib.as_array(batch.embd, shape=(n, self.n_embd))
        return batch

    # -- the eval callback ---------------------------------------------------------------------

    def _on_eval(self, tensor: int, ask: bool, _user_data: int) -> bool:
        name = ggml_base.ggml_get_name(tensor)
        if ask:
            return bool(name == self._target)
        if name != self._target:
            return True
        n_bytes = ggml_base.ggml_nbytes(tensor)
        rows = n_bytes // (4 * self.n_embd)
        ggml_base.ggml_backend_tensor_get(tensor, self._hidden_out.ctypes.data, 0, n_bytes)
        self._captured_rows = rows
        return False  # stop the graph: the rest of the model runs on the next stages

    # -- sessions ------------------------------------------------------------------------------

    def open_session(self, session_id: str) -> None:
        with self._lock:
            if session_id in self._sessions:
                return
            if not self._free_slots:
                raise NoFreeSessionError(
                    f"all {self.options.max_sessions} session slots of stage {self.layers} are busy"
                )
            self._sessions[session_id] = _Session(slot=self._free_slots.pop())

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return
            llama_cpp.llama_memory_seq_rm(self._memory(), session.slot, -1, -1)
            if session.sampler is not None:
                session.sampler.free()
            self._free_slots.append(session.slot)

    @property
    def busy(self) -> bool:
        """True while a call holds the stage (another would wait for it)."""
        return self._lock.locked()

    def session_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def session_length(self, session_id: str) -> int:
        return len(self._session(session_id).tokens)

    def session_tokens(self, session_id: str) -> list[int]:
        return list(self._session(session_id).tokens)

    def rollback(self, session_id: str, position: int) -> None:
        """Forget everything at and after `position` (regenerate, edit, a shorter new prompt)."""
        with self._lock:
            session = self._session(session_id)
            if position < len(session.tokens):
                llama_cpp.llama_memory_seq_rm(self._memory(), session.slot, position, -1)
                del session.tokens[position:]
                session.sampled = None

    def configure_sampling(self, session_id: str, params: SamplingParams) -> None:
        """Start a fresh sampler chain for a new generation; it sees the session's history."""
        if not self.is_last:
            return
        with self._lock:
            session = self._session(session_id)
            if session.sampler is not None:
                session.sampler.free()
            session.sampler = SamplerChain(params, self.n_vocab)
            for token in session.tokens[-max(params.repeat_last_n, 0) :]:
                session.sampler.accept(token)
            session.sampled = None

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise StageError(f"unknown session {session_id!r} on stage {self.layers}") from None

    def _memory(self) -> ctypes.c_void_p:
        return llama_cpp.llama_get_memory(self._ctx)

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        session_id: str,
        position: int,
        tokens: list[int],
        hidden: FloatArray | None = None,
        sample: bool = True,
        all_logits: bool = False,
    ) -> StageOutput:
        """Run this stage's layers on `tokens` (first stage) or `hidden` (others).

        `position` must equal the session's current length: the KV cache holds tokens
        [0, position). Non-first stages get the token ids too, so the last stage's sampler sees
        the history (repeat penalty). Longer inputs run in chunks of n_batch. The work runs on
        the process's compute thread (see meshchat.engine.compute); this call waits for it.
        """
        return compute.run_sync(
            self._forward, session_id, position, tokens, hidden, sample, all_logits
        )

    def _forward(
        self,
        session_id: str,
        position: int,
        tokens: list[int],
        hidden: FloatArray | None,
        sample: bool,
        all_logits: bool,
    ) -> StageOutput:
        with self._lock:
            session = self._session(session_id)
            if position != len(session.tokens):
                raise StageError(
                    f"session {session_id!r} is at position {len(session.tokens)} on stage "
                    f"{self.layers}, got input for position {position}"
                )
            n = len(tokens)
            if n == 0:
                raise StageError("empty input")
            if not self.is_first and (hidden is None or hidden.shape != (n, self.n_embd)):
                got = None if hidden is None else hidden.shape
                raise StageError(
                    f"stage {self.layers} expects hidden states of shape "
                    f"({n}, {self.n_embd}), got {got}"
                )
            if position + n > self.n_ctx:
                raise ContextOverflowError(
                    f"{position + n} tokens do not fit in the context window of {self.n_ctx}"
                )
            started = time.perf_counter()
            output = self._forward_chunks(session, position, tokens, hidden, sample, all_logits)
            self.timings.add(time.perf_counter() - started, n)
            return output

    def _forward_chunks(
        self,
        session: _Session,
        position: int,
        tokens: list[int],
        hidden: FloatArray | None,
        sample: bool,
        all_logits: bool,
    ) -> StageOutput:
        step = self.options.n_batch
        hidden_parts: list[FloatArray] = []
        logit_parts: list[FloatArray] = []
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            chunk_hidden = None if hidden is None else hidden[start : start + step]
            last_chunk = start + step >= len(tokens)
            self._decode(session, position + start, chunk, chunk_hidden, all_logits)
            self._note_tokens(session, position + start, chunk)
            if not self.is_last:
                hidden_parts.append(self._hidden_out[: len(chunk)].copy())
            elif all_logits:
                logit_parts.append(self._logits(len(chunk)))
            elif last_chunk:
                logit_parts.append(self._logits(1))
        if not self.is_last:
            return StageOutput(
                hidden=np.concatenate(hidden_parts) if len(hidden_parts) > 1 else hidden_parts[0]
            )
        output = StageOutput(logits=np.concatenate(logit_parts))
        if sample:
            output.token = self._sample(session, position + len(tokens))
        return output

    def _decode(
        self,
        session: _Session,
        position: int,
        tokens: list[int],
        hidden: FloatArray | None,
        all_logits: bool,
    ) -> None:
        n = len(tokens)
        batch = self._batch
        batch.n_tokens = n
        self._batch_pos[:n] = np.arange(position, position + n, dtype=np.int32)
        if self.is_first:
            self._batch_tokens[:n] = tokens
        else:
            assert hidden is not None
            self._batch_embd[:n] = hidden
        if self.is_last and not all_logits:
            self._batch_logits[:n] = 0
            self._batch_logits[n - 1] = 1
        else:
            # A stage that passes hidden states on needs every row of its last layer: without
            # an output flag llama.cpp keeps only the output rows there.
            self._batch_logits[:n] = 1
        if self._batch_slot != session.slot:
            for seq in self._batch_seq:
                seq[0] = session.slot
            self._batch_slot = session.slot
        self._captured_rows = 0
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise StageError(f"llama_decode failed on stage {self.layers} (status {status})")
        if not self.is_last and self._captured_rows != n:
            raise StageError(
                f"stage {self.layers} captured {self._captured_rows} hidden rows "
                f"for {n} tokens (llama.cpp graph names changed?)"
            )

    def _note_tokens(self, session: _Session, position: int, tokens: list[int]) -> None:
        if session.sampler is not None:
            for offset, token in enumerate(tokens):
                # The chain accepted its own sample already; accept everything else once.
                if session.sampled != (position + offset, token):
                    session.sampler.accept(token)
            session.sampled = None
        session.tokens.extend(tokens)

    def _logits(self, rows: int) -> FloatArray:
        pointer = llama_cpp.llama_get_logits(self._ctx)
        flat = np.ctypeslib.as_array(pointer, shape=(rows * self.n_vocab,))
        return flat.reshape(rows, self.n_vocab).copy()

    def _sample(self, session: _Session, next_position: int) -> int:
        if session.sampler is None:
            raise StageError("configure_sampling must be called before sampling")
        token = session.sampler.sample(self._ctx, -1)
        session.sampled = (next_position, token)
        return token

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                if session.sampler is not None:
                    session.sampler.free()
            self._sessions.clear()
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None  # type: ignore[assignment]
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None  # type: ignore[assignment]
            if self._model:
                llama_cpp.llama_model_free(self._model)
                self._model = None  # type: ignore[assignment]

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
