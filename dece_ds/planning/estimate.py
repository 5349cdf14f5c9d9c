"""Per-GPU memory and loss-collective plan for a DeepSpeed run with CE, DeCE or fused-linear DeCE.

All sizes are bytes on one GPU (one rank) for one micro-batch of ``N = micro_batch * seq_len`` tokens.
``dp = world_size / tp`` ranks share each ZeRO partition.

Model states (parameters, gradients, optimizer states)
    Tensor parallelism (DeepSpeed AutoTP) splits the decoder's linear weights and, when the head is not
    tied to the embedding, the LM head (``vocab_parallel_lm_head``); the input embedding, the norms and
    a tied head are replicated. ``P`` below is the resulting per-TP-rank parameter count.
    For bf16/fp16 (mixed precision, Adam) the per-GPU total is DeepSpeed's own estimator:
        stage 3: ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` =
                 4 * largest_layer + 18 P / dp          (offload cpu: 4 * largest_layer)
        stage 2: ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` =
                 2 P + 18 P / dp                         (offload cpu: 2 P)
    split with DeepSpeed's own multipliers: parameters 2 bytes (16-bit copy; stage 3 adds the gathered
    largest layer), gradients 2 + 4 (16-bit and fp32), optimizer 4 + 8 (fp32 master, Adam m and v).
    DeepSpeed has no estimator for stages 0 and 1; the same multipliers give stage 1 =
    2 P + 2 P + 16 P / dp (gradients unpartitioned, fp32 gradient partition and optimizer partitioned)
    and stage 0 = 20 P. fp32 training has no master copy: 4 P parameters, 4 P gradients, 8 P Adam,
    partitioned by stage as above. ``cpu_bytes`` reports DeepSpeed's host-memory estimate where it has one.

Activations (how they are estimated)
    The tensors autograd saves for backward, counted op by op for a pre-norm decoder layer with fused
    (flash / SDPA) attention, so no ``seq x seq`` score matrix is saved (Korthikanti et al. 2022,
    "Reducing Activation Recomputation", without its attention-score terms). Per token, ``b`` =
    bytes of the training dtype, ``h`` hidden, ``q = heads * head_dim``, ``kv = kv_heads * head_dim``,
    ``I`` intermediate size:
        RMSNorm (HF computes in fp32): fp32 input 4h + normalised b h + output b h  -> (4 + 2b) h, twice
        LayerNorm: input b h + output b h                                          -> 2 b h, twice
        attention: q and k after RoPE, v (kept by SDPA), its output, o_proj's input -> b (q + 2 kv) + 2 b q
                   (+ SDPA's fp32 log-sum-exp, 4 * heads)
        SwiGLU MLP: gate out, silu(gate), up out, their product                    -> 4 b I
        GELU MLP: fc out, gelu(fc)                                                  -> 2 b I
    times ``num_layers`` and ``N``, plus the final norm. TP (no sequence parallelism in AutoTP) divides
    the attention and MLP terms by ``tp``; the norms stay whole. With activation checkpointing each layer
    keeps only its input (``b h``) and one layer is live again during its recompute.

Logits and loss memory (``V_local = V / tp`` with the vocab-parallel head; logits in the training dtype)
    ce          the logits ``N x V_local`` (b) + about three fp32 ``N x V_local`` buffers (HF upcasts the
                logits, log_softmax keeps its output, backward writes the gradient; two when the logits are
                already fp32, as the upcast is then free)
    dece        the logits + one ``N x V_local`` gradient buffer in the logits dtype (written in the
                forward) + ``[chunk, V_local]`` scratch (three fp32 buffers)
    fused       no ``N x V`` tensor: the chunk's logits ``[chunk, V_local]`` in the training dtype, which their
                gradient overwrites (+ an fp32 gradient buffer for bf16 / fp16), one visit's scratch (three fp32
                ``[visit, V_local]`` buffers, at most the unfused budget), the head-weight gradient
                ``V_local x h`` (an fp32 accumulator on the rows walk; in the training dtype on the vocabulary
                walk that ``auto`` takes for chunks under 128 rows, or for a bf16 / fp16 head whose fp32
                accumulator would exceed its gradient by more than the budget: ``chunk_budget.weight_grad_bytes``)
                and the fp32 ``grad_hidden`` ``N x h``
    ``chunk``, ``visit`` and the scratch bytes per element come from ``dece_ds.ops.chunk_budget`` (the ops' own
    rule): rows = budget // (V_local * bytes per element), default budget 16 MiB unfused (and per fused visit)
    and 128 MiB fused, so the fused scratch stays near 144 MiB whatever V is. The ``dece`` section's
    ``chunk_budget_mib``, ``backend`` ("compile": no fp32 scratch unfused, so the same budget holds more rows)
    and ``logit_softcap`` (one more fp32 buffer, eager) are ``PlanInput`` fields and ``dece-ds plan`` flags.

Loss collectives per micro-batch (bytes each rank contributes; zero at tp = 1)
    dece (ours, vocab-parallel): all-gather of (N + 2) fp32 (the per-token log-sum-exp and the shard's
                two metadata values) + all-reduce of 2N fp32 (stacked partial sums)
    fused:      the same two per visit ((N + 2 * visits) fp32 gathered, 2N reduced) + the all-reduce of
                ``grad_hidden``, N x h in the training dtype
    ce (megatron's vocab-parallel CE): three all-reduces of N fp32 (max, target logit, sum of exp)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .shapes import ModelShape

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
LOSSES = ("ce", "dece", "fused")


@dataclass(frozen=True)
class PlanInput:
    world_size: int = 8
    tp: int = 1
    zero_stage: int = 3
    offload: str = "none"  # none | cpu (optimizer, and parameters at stage 3)
    micro_batch: int = 1
    seq_len: int = 4096
    dtype: str = "bf16"
    activation_checkpointing: bool = False
    # the dece section's loss options that size the loss's scratch (dece_ds.ops.chunk_budget)
    backend: str = "eager"                     # eager | compile
    chunk_budget_mib: float | None = None      # None: the ops' defaults (16 MiB unfused, 128 MiB fused)
    logit_softcap: bool = False                # soft-capping keeps one more fp32 buffer (eager)

    def __post_init__(self):
        for name in ("world_size", "tp", "micro_batch", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if self.world_size % self.tp:
            raise ValueError(f"tp: must divide world_size ({self.world_size}), got {self.tp}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload not in ("none", "cpu"):
            raise ValueError(f"offload: 'none' or 'cpu', got {self.offload!r}")
        if self.offload == "cpu" and self.zero_stage < 2:
            raise ValueError(f"offload: 'cpu' needs zero_stage 2 or 3, got {self.zero_stage}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        from ..ops.compiled import BACKENDS
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: one of {', '.join(BACKENDS)}, got {self.backend!r}")
        budget = self.chunk_budget_mib
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise ValueError(f"chunk_budget_mib: a finite number > 0 (MiB) or None, got {budget!r}")

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass
class Plan:
    model: str
    inputs: dict
    params_per_rank: int
    params_total: int
    largest_layer_params: int
    parameters: int
    gradients: int
    optimizer: int
    cpu_bytes: int | None
    estimator: str
    activations: int
    loss_memory: dict = field(default_factory=dict)      # loss -> bytes (logits included)
    loss_collectives: dict = field(default_factory=dict)  # loss -> {"all_gather": B, "all_reduce": B}

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    def total(self, loss: str) -> int:
        return self.model_states + self.activations + self.loss_memory[loss]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["model_states"] = self.model_states
        d["total"] = {k: self.total(k) for k in LOSSES}
        return d


# --------------------------------------------------------------------------------------- parameters

def params_per_tp_rank(shape: ModelShape, tp: int) -> tuple[int, int]:
    """(parameters one TP rank holds, its largest single module's parameters)."""
    p = shape.params()
    per_rank = p["embedding"] + p["replicated"] + math.ceil((p["layers_tp"] + p["lm_head"]) / tp)
    h, i = shape.hidden_size, shape.intermediate_size
    largest = max(p["embedding"], math.ceil(p["lm_head"] / tp), math.ceil(h * i / tp))
    return per_rank, largest


def model_states(shape: ModelShape, inp: PlanInput) -> dict:
    """Parameters / gradients / optimizer bytes per GPU (see the module docstring), and the source."""
    P, largest = params_per_tp_rank(shape, inp.tp)
    dp, stage, cpu = inp.dp, inp.zero_stage, inp.offload == "cpu"
    out = {"params_per_rank": P, "largest_layer_params": largest, "cpu_bytes": None}
    if inp.dtype == "fp32":
        part = {0: (1, 1, 1), 1: (1, 1, dp), 2: (1, dp, dp), 3: (dp, dp, dp)}[stage]
        out.update(parameters=4 * P // part[0] + (4 * largest if stage == 3 else 0), gradients=4 * P // part[1],
                   optimizer=8 * P // part[2], estimator="arithmetic (fp32: 4 + 4 + 8 bytes per parameter)")
        if cpu:
            out.update(gradients=0, optimizer=0)
            if stage == 3:
                out["parameters"] = 4 * largest
        return out
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        cpu_mem, gpu_mem, largest_mem = estimate_zero3_model_states_mem_needs(
            total_params=P, largest_layer_params=largest, num_gpus_per_node=dp, num_nodes=1,
            cpu_offload=cpu, cpu_offload_params=cpu, zero_init=True)
        if cpu:
            parts = (gpu_mem, 0, 0)
        else:
            parts = (largest_mem + int(2 * P / dp), int(6 * P / dp), int(10 * P / dp))
            parts = (parts[0], parts[1], gpu_mem - parts[0] - parts[1])  # 12 P / dp up to DeepSpeed's rounding
        out.update(parameters=parts[0], gradients=parts[1], optimizer=parts[2], cpu_bytes=cpu_mem,
                   estimator="deepspeed estimate_zero3_model_states_mem_needs")
        return out
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        cpu_mem, gpu_mem = estimate_zero2_model_states_mem_needs(
            total_params=P, num_gpus_per_node=dp, num_nodes=1, cpu_offload=cpu)
        if cpu:
            parts = (gpu_mem, 0, 0)
        else:
            parts = (2 * P, int(6 * P / dp), gpu_mem - 2 * P - int(6 * P / dp))
        out.update(parameters=parts[0], gradients=parts[1], optimizer=parts[2], cpu_bytes=cpu_mem,
                   estimator="deepspeed estimate_zero2_model_states_mem_needs")
        return out
    if stage == 1:
        out.update(parameters=2 * P, gradients=2 * P + int(4 * P / dp), optimizer=int(12 * P / dp),
                   estimator="arithmetic (DeepSpeed's multipliers; it has no stage-1 estimator)")
        return out
    out.update(parameters=2 * P, gradients=6 * P, optimizer=12 * P,
               estimator="arithmetic (DeepSpeed's multipliers; it has no stage-0 estimator)")
    return out


# -------------------------------------------------------------------------------------- activations

def activation_bytes_per_token(shape: ModelShape, dtype: str, tp: int = 1) -> dict:
    """Saved-for-backward bytes per token: ``per_layer`` and ``final`` (see the module docstring)."""
    b = DTYPE_BYTES[dtype]
    h, q, kv, i = shape.hidden_size, shape.q_size, shape.kv_size, shape.intermediate_size
    norm = (4 + 2 * b) * h if shape.norm == "rms" and b < 4 else (3 * b * h if shape.norm == "rms" else 2 * b * h)
    attn = b * (q + 2 * kv) + 2 * b * q + 4 * shape.num_heads
    mlp = (4 if shape.gated_mlp else 2) * b * i
    return {"per_layer": 2 * norm + (attn + mlp) / tp, "final": norm, "layer_input": b * h}


def activations(shape: ModelShape, inp: PlanInput) -> int:
    a = activation_bytes_per_token(shape, inp.dtype, inp.tp)
    if inp.activation_checkpointing:
        per_token = shape.num_layers * a["layer_input"] + a["per_layer"] + a["final"]
    else:
        per_token = shape.num_layers * a["per_layer"] + a["final"]
    return int(inp.tokens * per_token)


# ------------------------------------------------------------------------------------- loss + comms

def vocab_local(shape: ModelShape, tp: int) -> int:
    return math.ceil(shape.vocab_size / tp)


def chunk_rows(n_tokens: int, v_local: int, fused: bool = False, dtype: str = "fp32",
               inp: PlanInput | None = None) -> int:
    """Rows per chunk the ops use (``dece_ds.ops.chunk_budget.chunk_rows``: the ops' own rule), with the dtype and
    loss options of ``inp`` (backend, budget, soft-cap) when given (``dtype`` is then not used), else ``dtype``
    and the defaults."""
    from ..ops.chunk_budget import budget_mib_to_bytes, chunk_rows as rule
    inp = inp or PlanInput(dtype=dtype)
    return rule(n_tokens, v_local, fused=fused, dtype=inp.dtype, budget_bytes=budget_mib_to_bytes(inp.chunk_budget_mib),
                logit_softcap=inp.logit_softcap, backend=inp.backend)


def visit_rows(chunk: int, v_local: int, inp: PlanInput) -> int:
    """Rows per visit of a fused chunk (``dece_ds.ops.chunk_budget.visit_rows``), with ``inp``'s loss options."""
    from ..ops.chunk_budget import visit_rows as rule
    return rule(chunk, v_local, dtype=inp.dtype, logit_softcap=inp.logit_softcap, backend=inp.backend)


def _scratch_per_element(inp: PlanInput, fused: bool) -> int:
    from ..ops.chunk_budget import scratch_bytes_per_element
    return scratch_bytes_per_element(fused=fused, dtype=inp.dtype, logit_softcap=inp.logit_softcap,
                                     backend=inp.backend)


def loss_memory(shape: ModelShape, inp: PlanInput) -> dict[str, int]:
    from ..ops.chunk_budget import budget_mib_to_bytes, weight_grad_bytes
    N, V, b, h = inp.tokens, vocab_local(shape, inp.tp), DTYPE_BYTES[inp.dtype], shape.hidden_size
    c, cf = chunk_rows(N, V, inp=inp), chunk_rows(N, V, fused=True, inp=inp)
    visit = visit_rows(cf, V, inp)
    logits = N * V * b
    ce_buffers = 3 if b < 4 else 2
    budget = budget_mib_to_bytes(inp.chunk_budget_mib)
    weight_grad = weight_grad_bytes(N, V, h, cf, dtype=inp.dtype, budget_bytes=budget)
    return {
        "ce": logits + ce_buffers * 4 * N * V,
        "dece": logits + N * V * b + _scratch_per_element(inp, fused=False) * c * V,
        "fused": (_scratch_per_element(inp, fused=True) * cf + _scratch_per_element(inp, fused=False) * visit) * V
                 + weight_grad + 4 * N * h,
    }


def loss_collectives(shape: ModelShape, inp: PlanInput) -> dict[str, dict[str, int]]:
    if inp.tp == 1:
        return {k: {"all_gather": 0, "all_reduce": 0, "calls": 0} for k in LOSSES}
    N, b, h = inp.tokens, DTYPE_BYTES[inp.dtype], shape.hidden_size
    from ..ops.chunk_budget import visits
    v_local = vocab_local(shape, inp.tp)
    cf = chunk_rows(N, v_local, fused=True, inp=inp)
    n_visits = visits(N, cf, visit_rows(cf, v_local, inp))
    return {
        "ce": {"all_gather": 0, "all_reduce": 3 * 4 * N, "calls": 3},
        "dece": {"all_gather": 4 * (N + 2), "all_reduce": 4 * 2 * N, "calls": 2},
        "fused": {"all_gather": 4 * (N + 2 * n_visits), "all_reduce": 4 * 2 * N + b * N * h, "calls": 2 * n_visits + 1},
    }


def plan(shape: ModelShape, inp: PlanInput) -> Plan:
    states = model_states(shape, inp)
    return Plan(model=shape.name, inputs=asdict(inp), params_per_rank=states["params_per_rank"],
                params_total=shape.total_params(), largest_layer_params=states["largest_layer_params"],
                parameters=states["parameters"], gradients=states["gradients"], optimizer=states["optimizer"],
                cpu_bytes=states["cpu_bytes"], estimator=states["estimator"], activations=activations(shape, inp),
                loss_memory=loss_memory(shape, inp), loss_collectives=loss_collectives(shape, inp))
