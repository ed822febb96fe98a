"""CRD: contrastive representation distillation, with the NCE objective and memory banks of the paper.

Y. Tian, D. Krishnan, P. Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv 1910.10699.

Per source k the strategy holds two trainable linear embeddings, ``g_s`` (student feature -> d) and ``g_t``
(source feature -> d), each followed by L2 normalization, and two memory banks (buffers, ``num_train x d``):
``M_s`` of student embeddings and ``M_t`` of the source's, one row per training sample. With the student
embedding ``v_s = g_s(f_s)`` and the source embedding ``v_t = g_t(f_t)`` of sample i, the K negatives
``j_1..j_K`` drawn uniformly from the other training samples (never i itself), and

    P(v, r) = exp(<v, r> / tau) / Z                                            (Z: set once, below)
    h(v, r) = P(v, r) / (P(v, r) + K / N)                                      (N = num_train)
    L_nce(v, M) = -1/B sum_i [ log h(v_i, M[i]) + sum_k log(1 - h(v_i, M[j_k])) ]   (Eq. 18 of the paper)

the loss against source k is ``L_nce(v_s, M_t) + L_nce(v_t, M_s)``: the student embedding contrasted with
the source's memory and the source embedding with the student's (both anchors, as in the paper's code).
``Z`` (one per side) is the mean of ``exp(<v, r>/tau)`` over the first batch times N, fixed from then on
(RepDistiller's ``ContrastMemory``). After each step the rows of the batch are updated without gradient:

    M[i] <- normalize(m * M[i] + (1 - m) * v_i)                                (m = nce_mom)

The stage's loss is ``ce_weight * CE + feat_weight * combine_k L_k [+ kd_weight * T^2 KL(p_k || p_s)]``.
We use the NCE objective (paper Eq. 18, RepDistiller ``crd/criterion.py``, mdistiller ``CRD.py``), for which
the defaults (feat_weight 0.8, tau 0.07, K 16384) were tuned, not the softmax (InfoNCE) variant. Negatives are
uniform over all other samples: RepDistiller's CIFAR loader (``mode='exact'``) draws them from other *classes*,
which needs every training label up front; with 100 classes about 1% of ours share the anchor's class.
The negatives come from a ``torch.Generator`` seeded from (stage name, source name), so runs repeat.
The memory banks and Z are persistent buffers (state a resumed stage needs, 2 x N x d x 4 bytes per source:
51 MB for CIFAR's 50000 samples at d = 128); they live in the strategy and are never exported with the student.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.base import (
    STRATEGIES,
    BlockStrategy,
    LossTerms,
    StrategyContext,
    check_combine,
    check_number,
    combine_sources,
    combined_terms,
)
from kdlab.distill.losses import kd_loss
from kdlab.errors import ConfigError

log = logging.getLogger(__name__)

EPS = 1e-7  # RepDistiller's ContrastLoss eps


# -- the core, as plain functions (they run in float64 for gradcheck) ---------------------------------------
def contrast_scores(anchor: torch.Tensor, rows: torch.Tensor, tau: float) -> torch.Tensor:
    """``exp(<anchor_b, rows_b,j> / tau)``: (B, D) anchors against (B, 1 + K, D) memory rows -> (B, 1 + K)."""
    return torch.exp(torch.einsum("bd,bkd->bk", anchor, rows) / tau)


def nce_loss(scores: torch.Tensor, z: float | torch.Tensor, n_data: int) -> torch.Tensor:
    """The NCE loss (paper Eq. 18) of (B, 1 + K) unnormalized scores, column 0 the positive: with
    ``P = scores / Z`` and noise ``K / N``, ``-1/B sum_b [log P_0/(P_0 + K/N) + sum_k log (K/N)/(P_k + K/N)]``."""
    p = scores / z
    k = p.shape[1] - 1
    noise = k / float(n_data)
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + EPS))
    log_neg = torch.log(noise / (p[:, 1:] + noise + EPS))
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]


def sample_negatives(index: torch.Tensor, n_data: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, K) indices drawn uniformly from ``[0, n_data)`` minus each row's own ``index`` (with replacement):
    a draw from ``[0, n_data - 1)`` shifted up by one at and above the positive."""
    draw = torch.randint(0, n_data - 1, (index.shape[0], k), generator=generator, device=index.device)
    return draw + (draw >= index[:, None]).long()


def momentum_update(memory: torch.Tensor, index: torch.Tensor, v: torch.Tensor, momentum: float) -> None:
    """``memory[i] <- normalize(m * memory[i] + (1 - m) * v)`` for the rows ``index``, in place, no gradient."""
    with torch.no_grad():
        rows = memory.index_select(0, index) * momentum + v.detach().to(memory.dtype) * (1.0 - momentum)
        memory.index_copy_(0, index, F.normalize(rows, dim=1))


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under DDP, the rows of every rank (so that every rank's memory gets the same updates: DDP broadcasts
    rank 0's buffers at each forward and would otherwise drop the other ranks' updates); else the inputs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return tensors
    world = dist.get_world_size()
    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    out = []
    for t in tensors:
        padded = t.new_zeros((most, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]))
    return tuple(out)


def stable_seed(*parts: str) -> int:
    """A seed from names (the same on every run and machine; Python's ``hash`` is salted per process)."""
    return int(hashlib.sha256("/".join(parts).encode()).hexdigest()[:15], 16)


class Embed(nn.Module):
    """CRD's embedding: flatten, linear to ``feat_dim``, L2-normalize."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDHead(nn.Module):
    """One source's part: the two embeddings (trainable), the two memories and the two Z's (buffers)."""

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int, n_data: int, seed: int):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(feat_dim / 3)  # RepDistiller's initialization: uniform in [-stdv, stdv]
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim, generator=g) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim, generator=g) * (2 * stdv) - stdv)
        #: Z of (student anchor vs memory_t, source anchor vs memory_s); negative until the first batch sets it
        self.register_buffer("z", torch.full((2,), -1.0))
        self.seed = seed
        self.z_ready = False
        self._generators: dict[str, torch.Generator] = {}

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded Z (set or not) is looked at again
        super()._load_from_state_dict(*args, **kwargs)
        self.z_ready = False

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]


@STRATEGIES.register("crd")
class CRD(BlockStrategy):
    name = "crd"
    options: ClassVar[dict] = {
        "label_smoothing": 0.0, "temperature": 4.0, "kl_reduction": "batchmean",
        "crd": {"feat_weight": 0.8, "ce_weight": 1.0, "kd_weight": 0.0, "feat_dim": 128, "nce_k": 16384,
                "nce_t": 0.07, "nce_mom": 0.5, "student_tap": "embedding", "source_tap": "embedding",
                "combine": "mean"},
    }
    #: read only with ``crd.kd_weight > 0`` (and then hashed into the store key)
    LOGIT_KD_KEYS = ("temperature", "kl_reduction")
    read_when: ClassVar[str] = "crd.kd_weight > 0"
    hints: ClassVar[dict[str, str]] = {"lam": "crd.kd_weight"}  # lambda weights the KD term; CRD's KD is kd_weight

    def __init__(self, cfg: dict[str, Any], ctx: StrategyContext):
        super().__init__(cfg, ctx)
        o = self.opts
        self.weight, self.ce_weight, self.kd_weight = float(o["feat_weight"]), float(o["ce_weight"]), float(o["kd_weight"])
        self.feat_dim, self.nce_t, self.nce_mom = int(o["feat_dim"]), float(o["nce_t"]), float(o["nce_mom"])
        self.student_tap, self.source_tap = str(o["student_tap"]), str(o["source_tap"])
        self.n_data = int(ctx.num_train)
        if self.n_data < 2:
            raise ConfigError(f"CRD needs the training split's size (>= 2 samples, its memory has one row per "
                              f"sample, indexed by position), got num_train={ctx.num_train!r}")
        self.nce_k = int(o["nce_k"])
        if self.nce_k > self.n_data - 1:
            log.warning("distill.crd.nce_k=%d is more than the %d other training samples: using nce_k=%d",
                        self.nce_k, self.n_data - 1, self.n_data - 1)
            self.nce_k = self.n_data - 1
        s_shape = ctx.student_feature_shapes.get(self.student_tap)
        self.heads = nn.ModuleDict()
        for name in ctx.source_names:
            t_shape = ctx.source_feature_shapes.get(name, {}).get(self.source_tap)
            if s_shape is None or t_shape is None or not len(s_shape) or not len(t_shape):
                raise ConfigError(f"CRD needs features at tap {self.student_tap!r} (student) and {self.source_tap!r} "
                                  f"(source {name!r}); got shapes {s_shape} and {t_shape}")
            self.heads[name] = CRDHead(math.prod(s_shape), math.prod(t_shape), self.feat_dim, self.n_data,
                                       stable_seed("crd", ctx.stage, name))

    # -- config ------------------------------------------------------------------------------------------
    @classmethod
    def own_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Without logit KD (``crd.kd_weight: 0``) the temperature and KL reduction are never read: not hashed."""
        out = super().own_config(cfg)
        if not float(out["crd"]["kd_weight"]) > 0:
            for key in cls.LOGIT_KD_KEYS:
                out.pop(key)
        return out

    @classmethod
    def check_options(cls, block: dict[str, Any], where: str) -> None:
        # after the shared checks (label_smoothing, temperature, kl_reduction) and the block's keys
        for key in ("feat_weight", "ce_weight", "kd_weight"):
            check_number(f"{where}.{key}", block[key], low=0)
        check_number(f"{where}.feat_dim", block["feat_dim"], low=1, integer=True)
        check_number(f"{where}.nce_k", block["nce_k"], low=1, integer=True)
        check_number(f"{where}.nce_t", block["nce_t"], low=0, low_open=True)
        check_number(f"{where}.nce_mom", block["nce_mom"], low=0, high=1)
        if block["nce_mom"] == 1:
            raise ConfigError(f"{where}.nce_mom must be < 1 (1 never updates the memory), got {block['nce_mom']!r}")
        for key in ("student_tap", "source_tap"):
            if not isinstance(block[key], str) or not block[key]:
                raise ConfigError(f"{where}.{key} must be a feature point name (e.g. embedding), got {block[key]!r}")
        check_combine(where, block)

    # -- feature points ----------------------------------------------------------------------------------
    @classmethod
    def taps(cls, cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
        o = cls.block(cfg)
        return [str(o["student_tap"])], [str(o["source_tap"])]

    def student_taps(self) -> list[str]:
        return [self.student_tap]

    def source_taps(self) -> list[str]:
        return [self.source_tap]

    # -- the loss ----------------------------------------------------------------------------------------
    def _index(self, student) -> torch.Tensor:
        index = student.index
        if index is None:
            raise ConfigError("CRD needs each sample's position in the training split (StudentOutput.index), got "
                              "None: its memory is indexed by sample")
        index = torch.as_tensor(index).long().flatten()
        if index.shape[0] != student.logits.shape[0]:
            raise ConfigError(f"CRD: {index.shape[0]} sample indices for a batch of {student.logits.shape[0]}")
        if bool(((index < 0) | (index >= self.n_data)).any()):  # one device sync
            raise ConfigError(f"CRD: sample index out of range [0, {self.n_data}) (num_train): got "
                              f"{int(index.min())}..{int(index.max())}")
        return index

    def source_loss(self, name: str, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The loss against source ``name`` (both directions), then the momentum update of its memories."""
        head: CRDHead = self.heads[name]
        index = index.to(head.memory_s.device)
        v_s = head.embed_s(f_s.float())
        v_t = head.embed_t(f_t.float().to(v_s.device))
        neg = sample_negatives(index, self.n_data, self.nce_k, head.generator(index.device))
        rows = torch.cat([index[:, None], neg], dim=1).flatten()  # column 0: the positive
        b = index.shape[0]
        w_t = head.memory_t.index_select(0, rows).view(b, self.nce_k + 1, -1)
        w_s = head.memory_s.index_select(0, rows).view(b, self.nce_k + 1, -1)
        out_s = contrast_scores(v_s, w_t, self.nce_t)  # student anchor, the source's memory
        out_t = contrast_scores(v_t, w_s, self.nce_t)  # source anchor, the student's memory
        if not head.z_ready:  # looked at once per run (a resumed stage brings its Z along)
            with torch.no_grad():
                for i, out in enumerate((out_s, out_t)):
                    if head.z[i] < 0:
                        head.z[i] = out.mean() * self.n_data
            head.z_ready = True
        loss = nce_loss(out_s, head.z[0], self.n_data) + nce_loss(out_t, head.z[1], self.n_data)
        idx_all, vs_all, vt_all = gather_rows(index, v_s.detach(), v_t.detach())
        momentum_update(head.memory_s, idx_all, vs_all, self.nce_mom)
        momentum_update(head.memory_t, idx_all, vt_all, self.nce_mom)
        return loss

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        ce = self.ce_loss(student.logits.float(), y)
        per_source = []
        if sources:
            index = self._index(student)
            f_s = student.features[self.student_tap]
            with torch.autocast(device_type=f_s.device.type, enabled=False):  # scores / 0.07 in float32
                per_source = [{"crd": self.source_loss(name, f_s, out.features[self.source_tap], index)}
                              for name, out in sources.items()]
        terms = combined_terms(ce, per_source, ("crd",), self.combine)
        weights = {"ce": self.ce_weight, "crd": self.weight}
        if self.kd_weight > 0:
            kd = combine_sources([kd_loss(student.logits, s.logits, self.temperature, self.kl_reduction)
                                  for s in sources.values()], self.combine)
            terms["kd"] = ce.new_zeros(()) if kd is None else kd
            weights["kd"] = self.kd_weight
        return terms, weights
