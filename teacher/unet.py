"""The one UNet backbone shared by the teacher and the student.

The conditioning is a single embedding vector per example, the sum of
  time embedding (sinusoidal features of t -> MLP)
+ class embedding (num_classes + 1 rows; the last row is the learned *null* class)
+ guidance embedding (student only: sinusoidal features of w -> MLP, last layer zero)
computed in one place, :meth:`UNet.embed`. A student may also gate its class embedding
by w (``guidance_class_gate``): null + (1 + gate(w)) * (class - null), where gate is a
second such MLP, so w = 0 (the unconditional model) is one gate value away rather than
a cancellation the additive term must learn through the nonlinearities. With
``guidance_class_ramp`` r > 0 the offset is also multiplied by min(w / r, 1), so at w = 0 the class
embedding is the null class's exactly, whatever the gate learns. And each of its
res blocks may scale its features by 1 + f(embedding) (``guidance_film``, f a linear layer):
a multiplicative path for w beside the additive one (measured: it closed the student's
w = 0.5 accuracy gap, README). A student may take a negative class (``guidance_negative``):
its gate then works around the negative class instead of the null class, so one pass
gives negative-class guidance. A phase-two student (``guidance_negative_path``, trained on a
frozen stage-one student) keeps its gate around the null class and adds its own negative path instead
(:class:`NegativePath`): a gate of its own, -gate_neg(w) * (neg - null) in embedding space, and an MLP
of the embedding and that offset, adding to the embedding and (one bias-free layer per block) to each
block's film factor, all multiplied by ``(w - 1) * [y_neg != null]`` (the teacher's target moves from the
null-class one by (1 - w) (out(neg) - out(null))). With the null negative every term is an exact zero,
so the net is the stage-one student bit for bit; at init (and at w = 1) it is that student for every
negative. With the guidance MLPs' last layers and f at zero the student is exactly the teacher's
conditional model until it is trained. A CFG++ student (``guidance_uncond_head``) has twice the output
channels in its last convolution: its guided output at w = lambda, then its unconditional output, the
two halves starting as copies of the teacher's last convolution (student.model.student_from_teacher).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from distill.core.errors import UserError


def check_class_ramp(ramp: float) -> None:
    """``student.class_ramp`` (``guidance_class_ramp``): 0 = off, else the w where the class offset reaches full size."""
    if ramp < 0:
        raise UserError(f"student: class_ramp {ramp} must be >= 0 (0 = off)")


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild the network (stored with checkpoints and bundles)."""

    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    channels: int = 32
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attention: bool = True          # self-attention at the lowest resolution
    attention_resolutions: Sequence[int] = ()  # also after each res block at these feature-map sizes (DDPM: 16)
    groups: int = 8                 # GroupNorm groups
    scale_shift_norm: bool = False  # the embedding scales and shifts each block's normalised features (FiLM)
    time_scale: float = 1000.0      # t in [0, 1] is scaled before the sinusoidal features
    guidance_embed_dim: int = 0     # 0: teacher (no guidance input); > 0: student
    guidance_scale: float = 100.0   # w is scaled before its sinusoidal features
    guidance_class_gate: bool = False  # student: w also scales the class embedding (see above)
    guidance_class_ramp: float = 0.0  # student, > 0: the gated class offset also x min(w / ramp, 1) (w = 0: no class)
    guidance_film: bool = False     # student: each block also scales its features by 1 + f(embedding), f zero at init
    guidance_negative: bool = False  # student: the class gate's offset is a negative class input (null = the default)
    guidance_negative_path: bool = False  # phase-two student: a negative-class path, exactly zero for the null class
    guidance_uncond_head: bool = False  # CFG++ student: the last conv's output doubles, (guided at w = lambda, uncond)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"model: unknown UNet setting(s) {sorted(unknown)}")
        d = dict(d)
        for key in ("channel_mult", "attention_resolutions"):
            if key in d:
                d[key] = tuple(int(m) for m in d[key] or ())
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        # Written only when on, so a config without it equals the stored dicts of older
        # checkpoints, which resume and the teacher check compare as plain dicts.
        for flag in ("guidance_class_gate", "guidance_class_ramp", "guidance_film", "guidance_negative",
                     "guidance_negative_path", "guidance_uncond_head", "scale_shift_norm", "attention_resolutions"):
            if not d[flag]:
                del d[flag]
        return d

    def validate(self) -> None:
        levels = len(self.channel_mult)
        if self.image_size % (2 ** (levels - 1)) != 0:
            raise UserError(
                f"model: image size {self.image_size} cannot be halved {levels - 1} time(s) by the UNet "
                f"(channel_mult has {levels} levels); use a size divisible by {2 ** (levels - 1)}"
            )
        sizes = self.feature_sizes()
        for r in self.attention_resolutions:
            if r not in sizes:
                raise UserError(
                    f"model: attention_resolutions {list(self.attention_resolutions)}: {r} is not a feature-map size "
                    f"of this UNet (sizes {', '.join(map(str, sizes))} for {self.image_size}x{self.image_size} images)"
                )
        for m in self.channel_mult:
            if (self.channels * m) % self.groups:
                raise UserError(f"model: channels {self.channels * m} not divisible by groups {self.groups}")
        if self.guidance_negative and not (self.guidance_embed_dim > 0 and self.guidance_class_gate):
            raise UserError("student: a negative-class input needs the class gate (student.class_gate=true)")
        check_class_ramp(self.guidance_class_ramp)
        if self.guidance_class_ramp and not (self.guidance_embed_dim > 0 and self.guidance_class_gate):
            raise UserError("student: the class ramp scales the class gate's offset (student.class_gate=true)")
        if self.guidance_negative_path and not self.guidance_negative:
            raise UserError("student: a negative-class path needs the negative-class input (guidance_negative)")
        if self.guidance_uncond_head and not self.guidance_embed_dim > 0:
            raise UserError("model: an unconditional output head (guidance_uncond_head) is for a student only")


    @property
    def out_channels(self) -> int:
        """Channels of the network's output: the image's, twice for a CFG++ student (guided, then unconditional)."""
        return self.in_channels * (2 if self.guidance_uncond_head else 1)

    def feature_sizes(self) -> list[int]:
        """The feature-map size (pixels a side) at each level, finest first."""
        return [self.image_size // 2 ** level for level in range(len(self.channel_mult))]


def sinusoidal_features(x: ms.Tensor, freqs: ms.Tensor) -> ms.Tensor:
    """[cos, sin] features of a (B,) tensor for the given (D/2,) frequencies -> (B, D)."""
    args = x.reshape(-1, 1) * freqs.reshape(1, -1)
    return ops.cat([ops.cos(args), ops.sin(args)], axis=1)


def frequencies(dim: int, max_period: float = 10000.0) -> ms.Tensor:
    half = dim // 2
    return ms.Tensor(np.exp(-math.log(max_period) * np.arange(half) / half).astype(np.float32))


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    # MindSpore defaults are pad_mode="same", has_bias=False: say what we mean.
    return nn.Conv2d(cin, cout, 3, pad_mode="pad", padding=1, has_bias=True)


def zero_(cell: nn.Cell) -> nn.Cell:
    for p in cell.get_parameters():
        p.set_data(ops.zeros(p.shape, p.dtype))
    return cell


class EmbeddingMLP(nn.Cell):
    """Sinusoidal features of a scalar per example -> Linear -> SiLU -> Linear."""

    def __init__(self, feature_dim: int, out_dim: int, scale: float, zero_last: bool = False) -> None:
        super().__init__()
        self.freqs = frequencies(feature_dim)
        self.scale = scale
        self.fc1 = nn.Dense(feature_dim, out_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Dense(out_dim, out_dim)
        if zero_last:
            zero_(self.fc2)

    def construct(self, s: ms.Tensor) -> ms.Tensor:
        return self.fc2(self.act(self.fc1(sinusoidal_features(s * self.scale, self.freqs))))


class ResBlock(nn.Cell):
    """GroupNorm-SiLU-conv twice with a skip; the embedding either adds a per-channel bias before
    the second norm, or (``scale_shift_norm``, as in ADM) sets a per-channel scale and shift after
    it: multiplicative conditioning, so the class and w can amplify features, not only offset them."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, scale_shift_norm: bool = False,
                 guidance_film: bool = False, attention: bool = False, negative_path: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = conv3x3(cin, cout)
        self.scale_shift_norm = scale_shift_norm
        self.emb = nn.Dense(emb_dim, 2 * cout if scale_shift_norm else cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = zero_(conv3x3(cout, cout))  # each block starts as the identity
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(cin, cout, 1, has_bias=True) if cin != cout else nn.Identity()
        self.has_guidance_film = guidance_film
        # student only: a multiplicative path the teacher lacks, zero at init so the student starts as the teacher
        self.guidance_film = zero_(nn.Dense(emb_dim, cout)) if guidance_film else None
        # phase-two student only: the negative path's term of the film factor, bias-free so a zero input gives zero
        self.has_negative_film = negative_path
        self.negative_film = zero_(nn.Dense(emb_dim, cout, has_bias=False)) if negative_path else None
        # self-attention after the block (``attention_resolutions``); absent otherwise, so older checkpoints keep their names
        self.has_attention = attention
        self.attn = Attention(cout, groups) if attention else None

    def conditioning(self, emb: ms.Tensor, negative: Optional[ms.Tensor] = None) -> tuple[ms.Tensor, ms.Tensor]:
        """What this block takes from the embedding: its projection, (B, C, 1, 1) or (B, 2C, 1, 1), and the
        film factor (B, C, 1, 1). It does not depend on x, so a sampler computes it once for all steps.
        ``negative``: the negative path's weighted hidden features (:class:`NegativePath`), zero rows for
        the null class, which add ``negative_film(negative)`` (exactly zero there) to the film factor."""
        emb = self.act(emb)
        b = emb.shape[0]
        e = self.emb(emb).reshape(b, -1, 1, 1)  # shaped for the features here, not per sampler step
        if self.has_guidance_film:
            film = 1.0 + self.guidance_film(emb)
            if self.has_negative_film and negative is not None:
                film = film + self.negative_film(negative)
            film = film.reshape(b, -1, 1, 1)
        else:
            film = ops.ones((1, 1, 1, 1), emb.dtype)
        return e, film

    def apply(self, x: ms.Tensor, e: ms.Tensor, film: ms.Tensor) -> ms.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        if self.scale_shift_norm:
            scale, shift = ops.split(e, h.shape[1], axis=1)
            h = self.norm2(h) * (1.0 + scale) + shift
        else:
            h = self.norm2(h + e)
        if self.has_guidance_film:
            h = h * film
        h = self.conv2(self.act(h))
        h = self.skip(x) + h
        return self.attn(h) if self.has_attention else h

    def construct(self, x: ms.Tensor, emb: ms.Tensor) -> ms.Tensor:
        e, film = self.conditioning(emb)
        return self.apply(x, e, film)


class Attention(nn.Cell):
    """Single-head self-attention over the pixels of the lowest resolution."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1, has_bias=True)
        self.proj = zero_(nn.Conv2d(ch, ch, 1, has_bias=True))
        self.scale = 1.0 / math.sqrt(ch)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        b, c, h, w = x.shape
        q, k, v = ops.split(self.qkv(self.norm(x)).reshape(b, 3 * c, h * w), c, axis=1)
        attn = ops.softmax(ops.bmm(q.transpose(0, 2, 1), k) * self.scale, axis=-1)  # (b, hw, hw)
        out = ops.bmm(v, attn.transpose(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Cell):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, pad_mode="pad", padding=1, has_bias=True)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.conv(x)


class Upsample(nn.Cell):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = conv3x3(ch, ch)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        b, c, h, w = x.shape
        x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
        return self.conv(x)


def negative_weight(y_neg: ms.Tensor, w: ms.Tensor, null_class: int) -> ms.Tensor:
    """(B, 1): (w - 1) where the negative class is a real class, 0 where it is the null class. The teacher's
    target moves from the null-class one by (1 - w) (out(neg) - out(null)): nothing at w = 1, so the
    phase-two path, scaled by this, leaves the stage-one student exactly as it is there too."""
    return (y_neg != null_class).astype(ms.float32).reshape(-1, 1) * (w.reshape(-1, 1) - 1.0)


class NegativePath(nn.Cell):
    """The phase-two student's own negative-class path, from the negative class's ``offset`` from the null
    class (zero for the null class): a gate of w, ``-gate(w) * offset`` (the stage-one gate's
    ``gate(w) * (class - null)`` with the negative in place of the class, zero at init), plus
    (embedding, offset) -> Linear -> SiLU, times a per-row weight (:func:`negative_weight`), -> a bias-free
    Linear (zero at init), both added to the embedding; each res block reads the same weighted hidden
    features through its own bias-free ``negative_film``."""

    def __init__(self, emb_dim: int, w_features: int, w_scale: float) -> None:
        super().__init__()
        self.gate = EmbeddingMLP(w_features, emb_dim, w_scale, zero_last=True)
        self.fc1 = nn.Dense(2 * emb_dim, emb_dim)
        self.act = nn.SiLU()
        self.out = zero_(nn.Dense(emb_dim, emb_dim, has_bias=False))

    def construct(self, emb: ms.Tensor, offset: ms.Tensor, weight: ms.Tensor) -> ms.Tensor:
        """The weighted hidden features (rows of exact zeros where ``weight`` is 0)."""
        return self.act(self.fc1(ops.cat([self.act(emb), offset], axis=1))) * weight

    def shift(self, hidden: ms.Tensor, offset: ms.Tensor, w: ms.Tensor, weight: ms.Tensor) -> ms.Tensor:
        """What the path adds to the embedding: exact zeros where ``weight`` is zero."""
        return self.out(hidden) - self.gate(w) * offset * weight


class UNet(nn.Cell):
    """eps/v-prediction UNet: ``construct(x, t, y, w) -> output`` (same shape as x).

    ``y`` is the class index; ``num_classes`` is the null class used for the
    unconditional branch. ``w`` is the guidance weight, used only when the config has a
    guidance embedding (the teacher ignores it, so both share one call signature).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        ch, groups = config.channels, config.groups
        emb_dim = 4 * ch
        film = config.guidance_film and config.guidance_embed_dim > 0
        attn_sizes = set(config.attention_resolutions)
        sizes = config.feature_sizes()
        negative_path = film and config.guidance_negative_path
        block = lambda cin, cout, level=None: ResBlock(cin, cout, emb_dim, groups, config.scale_shift_norm, film,
                                                       level is not None and sizes[level] in attn_sizes,
                                                       negative_path)
        self.time_embed = EmbeddingMLP(ch, emb_dim, config.time_scale)
        self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim)
        self.has_guidance = config.guidance_embed_dim > 0
        self.guidance_embed: Optional[EmbeddingMLP] = None
        if self.has_guidance:
            self.guidance_embed = EmbeddingMLP(
                config.guidance_embed_dim, emb_dim, config.guidance_scale, zero_last=True
            )
        self.has_class_gate = self.has_guidance and config.guidance_class_gate
        self.has_negative = self.has_class_gate and config.guidance_negative
        self.has_class_ramp = self.has_class_gate and config.guidance_class_ramp > 0
        self.class_ramp = float(config.guidance_class_ramp)
        self.null_class = config.num_classes
        self.guidance_gate: Optional[EmbeddingMLP] = None
        if self.has_class_gate:
            self.guidance_gate = EmbeddingMLP(
                config.guidance_embed_dim, emb_dim, config.guidance_scale, zero_last=True
            )
        self.has_negative_path = self.has_negative and config.guidance_negative_path
        self.negative_path: Optional[NegativePath] = NegativePath(
            emb_dim, config.guidance_embed_dim, config.guidance_scale) if self.has_negative_path else None

        self.conv_in = conv3x3(config.in_channels, ch)
        widths = [ch * m for m in config.channel_mult]
        down, skips, cur = [], [ch], ch
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                down.append(block(cur, width, level))
                cur = width
                skips.append(cur)
            if level < len(widths) - 1:
                down.append(Downsample(cur))
                skips.append(cur)
        self.down = nn.CellList(down)
        self.mid1 = block(cur, cur)
        self.mid_attn = Attention(cur, groups) if config.attention else nn.Identity()
        self.mid2 = block(cur, cur)
        up = []
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(config.num_res_blocks + 1):
                up.append(block(cur + skips.pop(), width, level))
                cur = width
            if level > 0:
                up.append(Upsample(cur))
        self.up = nn.CellList(up)
        self.is_resblock_down = [isinstance(c, ResBlock) for c in down]
        self.is_resblock_up = [isinstance(c, ResBlock) for c in up]
        self.norm_out = nn.GroupNorm(groups, cur)
        self.act = nn.SiLU()
        self.conv_out = zero_(conv3x3(cur, config.out_channels))

    def embed(self, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_neg: Optional[ms.Tensor] = None) -> ms.Tensor:
        """The one conditioning vector: time + class (+ guidance for the student).

        A student with a negative-class input (``guidance_negative``) gates its class embedding
        around the negative class ``y_neg`` instead of the null class: neg + (1 + gate(w)) * (class - neg),
        the embedding-space image of the teacher's ``out(neg) + w (out(y) - out(neg))``; with
        ``y_neg`` null (or None) it is exactly the null-negative student. A phase-two student keeps the gate
        around the null class (its negative path adds the rest, :meth:`conditioning`). Other nets ignore ``y_neg``."""
        c = self.class_embed(y)
        if self.has_class_gate:
            if self.has_negative and not self.has_negative_path and y_neg is not None:
                base = self.class_embed(y_neg)
            else:
                base = self.class_embed(ops.ones_like(y) * self.null_class)
            if self.has_class_ramp:
                # base + min(w / ramp, 1) (1 + gate) (c - base): the base class exactly at w = 0 whatever the gate
                # learns; at init (ramp 1) the embedding-space image of CFG's uncond + w (cond - uncond) for w <= 1
                ramp = ops.clip_by_value(w / self.class_ramp, 0.0, 1.0).reshape(-1, 1).astype(c.dtype)
                c = base + ramp * (c - base) * (1.0 + self.guidance_gate(w))
            else:
                c = c + self.guidance_gate(w) * (c - base)  # = base + (1 + gate) * (c - base), exact at gate 0
        emb = self.time_embed(t) + c
        if self.has_guidance:
            emb = emb + self.guidance_embed(w)
        return emb

    def conditioning(self, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor,
                     y_neg: Optional[ms.Tensor] = None) -> tuple[ms.Tensor, ...]:
        """Everything the backbone takes from (t, y, w): two tensors per res block (its embedding
        projection and film factor, :meth:`ResBlock.conditioning`), in the order the backbone uses
        them. It does not depend on x, so a sampler computes it once for all its steps."""
        emb = self.embed(t, y, w, y_neg)
        neg = None
        if self.has_negative_path and y_neg is not None:
            offset = self.class_embed(y_neg) - self.class_embed(ops.ones_like(y_neg) * self.null_class)
            weight = negative_weight(y_neg, w, self.null_class)
            neg = self.negative_path(emb, offset, weight)
            emb = emb + self.negative_path.shift(neg, offset, w, weight)  # exact zeros for the null class, and at w = 1
        out = ()
        for i, cell in enumerate(self.down):
            if self.is_resblock_down[i]:
                out = out + cell.conditioning(emb, neg)
        out = out + self.mid1.conditioning(emb, neg) + self.mid2.conditioning(emb, neg)
        for i, cell in enumerate(self.up):
            if self.is_resblock_up[i]:
                out = out + cell.conditioning(emb, neg)
        return out

    def backbone(self, x: ms.Tensor, cond: tuple[ms.Tensor, ...]) -> ms.Tensor:
        """The network on x given :meth:`conditioning`'s tensors."""
        h = self.conv_in(x)
        hs = [h]
        k = 0
        for i, cell in enumerate(self.down):
            if self.is_resblock_down[i]:
                h = cell.apply(h, cond[k], cond[k + 1])
                k += 2
            else:
                h = cell(h)
            hs.append(h)
        h = self.mid1.apply(h, cond[k], cond[k + 1])
        h = self.mid2.apply(self.mid_attn(h), cond[k + 2], cond[k + 3])
        k += 4
        n = len(hs)
        used = 0
        for i, cell in enumerate(self.up):
            if self.is_resblock_up[i]:
                used += 1
                h = cell.apply(ops.cat([h, hs[n - used]], axis=1), cond[k], cond[k + 1])  # index, not pop(): jit-safe
                k += 2
            else:
                h = cell(h)
        return self.conv_out(self.act(self.norm_out(h)))

    def construct(self, x: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor,
                  y_neg: Optional[ms.Tensor] = None) -> ms.Tensor:
        return self.backbone(x, self.conditioning(t, y, w, y_neg))


def count_parameters(net: nn.Cell) -> int:
    return int(sum(np.prod(p.shape) for p in net.trainable_params()))
