"""A NaViT image encoder exported by navit-clip: needs only torch (PIL for the processor).

Files of an export folder:
    model.safetensors        weights;  config.json   architecture;  preprocessor_config.json
    navit_encoder.py         this file;  navit_layers.py, navit_posemb.py   the layers it is built of
    navit_text.py            the text tower's code (always: transformers checks every import)
    text_model.safetensors, text_config.json    with --with-text: NaViTTextEncoder
    modeling_navit.py        the Hugging Face wrapper (AutoModel with trust_remote_code=True)
    encoder.onnx             the packed interface in ONNX (dynamic tokens and images)

Use:
    import sys; sys.path.insert(0, "OUT_DIR")
    from navit_encoder import NaViTEncoder, NaViTProcessor
    enc = NaViTEncoder.from_pretrained("OUT_DIR")
    proc = NaViTProcessor.from_pretrained("OUT_DIR", max_tokens=256)
    out = enc(**proc(pil_images))            # Qwen2-VL-style flat patches + per-image grid
    out["last_hidden_state"]  [sum_n, D]  per-token features, image after image, row-major
    out["pooler_output"]      [n, D]      pooled per image (MAP, mean, or the class token's output)
    out["image_embeds"]       [n, E]      the CLIP image embedding (projected, not normalised)

Shape legend: T tokens of all images (sum_n), n images, C = P*P*3, D width, H heads, d head width.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

try:  # inside a package (Hugging Face remote code) or as plain modules next to each other
    from .navit_layers import build_tower, embed_tokens, mean_pool, projection
    from .navit_posemb import FactorizedPosEmb, rope2d_positions, with_rope2d
except ImportError:
    from navit_layers import build_tower, embed_tokens, mean_pool, projection
    from navit_posemb import FactorizedPosEmb, rope2d_positions, with_rope2d

CONFIG_KEYS = (
    "patch_size",
    "width",
    "depth",
    "heads",
    "mlp_ratio",
    "qk_norm",
    "bias",
    "posemb",
    "max_grid",
    "rope_span",
    "rope_mode",
    "pool",
    "ln_eps",
    "ln_pre",
    "cls_token",
    "act",
    "posemb_interp",
    "fc_norm",
    "patch_bias",
    "image_proj",
    "embed_dim",
)
_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file with torch alone (8-byte header size, JSON header, raw data)."""
    data = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = bytearray(data[base + start : base + end])
        out[name] = (
            torch.frombuffer(buf, dtype=_DTYPES[meta["dtype"]]).reshape(meta["shape"]).clone()
            if buf
            else torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]])
        )
    return out


def token_layout(grid_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (row, col) [T, 2], image grid (h, w) [T, 2] and image index [T] for images laid out
    one after another, each in row-major patch order, from their grids [n, 2]."""
    counts = grid_hw[:, 0] * grid_hw[:, 1]
    seg_T = torch.repeat_interleave(torch.arange(len(grid_hw), device=grid_hw.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    j_T = torch.arange(int(counts.sum()), device=grid_hw.device) - starts[seg_T]
    w_T = grid_hw[seg_T, 1]
    return torch.stack([j_T // w_T, j_T % w_T], 1), grid_hw[seg_T], seg_T


class NaViTEncoderMixin:
    """The encoder's modules and forward passes, shared by the plain module and the HF wrapper."""

    def _build(self, cfg: dict) -> None:
        self.navit_config = dict(cfg)
        c = SimpleNamespace(**cfg)
        posemb = FactorizedPosEmb(c.posemb, c.width, c.max_grid, interp=cfg.get("posemb_interp", "bicubic"))
        build_tower(self, c, posemb)
        self.image_proj = projection(cfg.get("image_proj", "linear"), c.width, c.embed_dim)

    def forward_tokens(
        self,
        pixel_values: torch.Tensor,
        coords: torch.Tensor,
        token_grid: torch.Tensor,
        segment_ids: torch.Tensor,
        grid_hw: torch.Tensor,
        with_penultimate: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """The traceable core (exported to ONNX): per-token layout in, (tokens [T, D], pooled [n, D],
        image_embeds [n, E]) out, and with `with_penultimate` the last block's input tokens [T, D]. Attention is block-diagonal through a [T, T] segment mask."""
        n, T = grid_hw.shape[0], pixel_values.shape[0]
        is_cls = None
        if self.cls_token is not None:  # one class token per image, after all patches: the mask keeps
            image_n = torch.arange(n, device=segment_ids.device)  # each with its own image's tokens
            pixel_values = torch.cat([pixel_values, pixel_values.new_zeros(n, pixel_values.shape[1])])
            coords = torch.cat([coords, coords.new_zeros(n, 2)])
            token_grid = torch.cat([token_grid, grid_hw])
            segment_ids = torch.cat([segment_ids, image_n])
            is_cls = torch.arange(T + n, device=segment_ids.device) >= T
        x_1TD = embed_tokens(self, pixel_values, coords, token_grid, is_cls)[None]
        mask_11TT = (segment_ids[:, None] == segment_ids[None, :])[None, None]

        def attend(q_1THd, k_1THd, v_1THd):
            o = F.scaled_dot_product_attention(
                q_1THd.transpose(1, 2), k_1THd.transpose(1, 2), v_1THd.transpose(1, 2), attn_mask=mask_11TT
            )
            return o.transpose(1, 2)

        if self.posemb.rope:
            cfg = self.navit_config
            pos_T2 = rope2d_positions(
                coords, token_grid, cfg.get("rope_span", 0.0), cfg.get("rope_mode", "span")
            )
            attend = with_rope2d(
                attend, pos_T2[None], self.navit_config["width"] // self.navit_config["heads"]
            )
        penultimate_1TD = x_1TD
        for block in self.blocks:
            penultimate_1TD = x_1TD
            x_1TD = block(x_1TD, attend)
        fc_norm = self.navit_config.get("fc_norm", False)  # the final norm after pooling (timm's)
        if not fc_norm:
            x_1TD = self.norm(x_1TD)
        x_TD = x_1TD[0]
        pool = self.navit_config["pool"]
        if is_cls is not None:  # pool=cls reads the class tokens, the others pool the patches alone
            pooled_nD = x_TD[T:]
            x_TD, segment_ids = x_TD[:T], segment_ids[:T]
        if self.head is not None:
            pooled_nD = self.head(x_TD, segment_ids, torch.ones(n, dtype=torch.bool, device=x_TD.device))
        elif pool == "mean":
            pooled_nD = mean_pool(x_TD, segment_ids, n)
        if fc_norm:
            pooled_nD = self.norm(pooled_nD)
        if with_penultimate:  # the patch tokens' input to the last block, un-normed
            return x_TD, pooled_nD, self.image_proj(pooled_nD), penultimate_1TD[0, :T]
        return x_TD, pooled_nD, self.image_proj(pooled_nD)

    def forward(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Qwen2-VL-style packed input: flat patches of all images [T, C] and their grids [n, 2]."""
        if pixel_values.shape[0] != int((grid_hw[:, 0] * grid_hw[:, 1]).sum()):
            raise ValueError(
                f"{pixel_values.shape[0]} patches but grid_hw accounts for "
                f"{int((grid_hw[:, 0] * grid_hw[:, 1]).sum())}"
            )
        coords, token_grid, seg = token_layout(grid_hw)
        tokens, pooled, embeds, penultimate = self.forward_tokens(
            pixel_values, coords, token_grid, seg, grid_hw, with_penultimate=True
        )
        return {
            "last_hidden_state": tokens,
            "pooler_output": pooled,
            "image_embeds": embeds,
            # what LLaVA-style VLMs read (transformers' hidden_states[-2]): before the last block, un-normed
            "penultimate_hidden_state": penultimate,
        }

    def forward_padded(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """SigLIP2-NaFlex-style input: one image per row, [B, N, C] padded patches, a [B, N] mask of
        real patches (each row's first h*w) and spatial_shapes [B, 2]. Returns [B, N, D] tokens
        (zeros at padding), [B, D] pooled and [B, E] embeddings."""
        mask = pixel_attention_mask.bool()
        out = self.forward(pixel_values[mask], spatial_shapes)
        tokens = out["last_hidden_state"].new_zeros(*mask.shape, out["last_hidden_state"].shape[-1])
        tokens[mask] = out["last_hidden_state"]
        return {
            "last_hidden_state": tokens,
            "pooler_output": out["pooler_output"],
            "image_embeds": out["image_embeds"],
        }


def merge_2x2(tokens: torch.Tensor, grid_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group each 2 x 2 block of neighbouring tokens into one: [T, D] -> [T/4, 4D] (4x fewer LLM
    tokens, as Qwen2-VL's merger consumes them); returns the merged grids [n, 2] too. Needs even
    grids (NaViTProcessor(merge=2) makes them)."""
    if bool(((grid_hw % 2) != 0).any()):
        raise ValueError("merge_2x2 needs even grid sides; build the inputs with NaViTProcessor(merge=2)")
    out, start = [], 0
    for h, w in grid_hw.tolist():
        x = tokens[start : start + h * w].view(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4)
        out.append(x.reshape(h * w // 4, -1))
        start += h * w
    return torch.cat(out), grid_hw // 2


class NaViTEncoder(NaViTEncoderMixin, nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self._build({k: config[k] for k in CONFIG_KEYS if k in config})  # older exports lack ln_pre

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> NaViTEncoder:
        folder = Path(folder)
        model = cls(json.loads((folder / "config.json").read_text()))
        model.load_state_dict(load_safetensors(folder / "model.safetensors"))
        return model.eval()


class NaViTTextEncoder(nn.Module):
    """The text tower of an export made with --with-text: token ids [N, K] -> embeddings [N, E].

    Tokenise as text_config.json's "tokenizer" says (the default, openclip, is open_clip's BPE:
    open_clip.tokenizer.SimpleTokenizer(context_length)).
    """

    def __init__(self, config: dict):
        super().__init__()
        try:
            from .navit_text import TextConfig, TextTransformer
        except ImportError:
            from navit_text import TextConfig, TextTransformer
        self.text = TextTransformer(TextConfig(**config["text"]))
        self.text_proj = projection(
            config.get("text_proj", "linear"), config["text"]["width"], config["embed_dim"]
        )
        self.logit_scale = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> NaViTTextEncoder:
        folder = Path(folder)
        if not (folder / "text_model.safetensors").exists():
            raise FileNotFoundError(
                f"{folder} holds no text tower: export it with `navit-clip export CKPT OUT --with-text`"
            )
        model = cls(json.loads((folder / "text_config.json").read_text()))
        state = load_safetensors(folder / "text_model.safetensors")
        model.load_state_dict({k: v for k, v in state.items() if k != "logit_bias"})
        return model.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text(ids))


class NaViTProcessor:
    """PIL images -> flat patches at native aspect ratio within a token budget.

    Each image is resized (bilinear) to the largest size with the same aspect ratio whose patch grid
    has at most `max_tokens` patches (sides multiples of P; of 2P with merge=2), normalised and cut
    into row-major patches flattened as (row in patch, column in patch, channel).
    """

    def __init__(self, patch_size: int, mean, std, max_tokens: int = 256, merge: int = 1):
        self.patch_size, self.mean, self.std = patch_size, tuple(mean), tuple(std)
        self.max_tokens, self.merge = max_tokens, merge

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> NaViTProcessor:
        cfg = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        cfg.update(overrides)
        return cls(
            cfg["patch_size"],
            cfg["image_mean"],
            cfg["image_std"],
            cfg.get("max_tokens", 256),
            cfg.get("merge", 1),
        )

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        unit = self.patch_size * self.merge
        scale = math.sqrt(self.max_tokens * self.patch_size**2 / (height * width)) * 1.05
        while True:
            h = max(1, round(height * scale / unit)) * self.merge
            w = max(1, round(width * scale / unit)) * self.merge
            if h * w <= self.max_tokens or (h == self.merge and w == self.merge):
                return h, w
            scale *= 0.98

    def image_patches(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        P = self.patch_size
        image = image.convert("RGB")
        h, w = self.grid_for(image.height, image.width)
        if image.size != (w * P, h * P):
            image = image.resize((w * P, h * P), 2)  # PIL.Image.BILINEAR
        x = (
            torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h * P, w * P, 3).float()
            / 255
        )
        x = (x - torch.tensor(self.mean)) / torch.tensor(self.std)
        return x.view(h, P, w, P, 3).permute(0, 2, 1, 3, 4).reshape(h * w, P * P * 3), (h, w)

    def __call__(self, images, padded: bool = False) -> dict[str, torch.Tensor]:
        cut = [self.image_patches(im) for im in images]
        grid_hw = torch.tensor([g for _, g in cut], dtype=torch.long)
        if not padded:
            return {"pixel_values": torch.cat([p for p, _ in cut]), "grid_hw": grid_hw}
        N = max(self.max_tokens, max(p.shape[0] for p, _ in cut))
        values = torch.zeros(len(cut), N, cut[0][0].shape[1])
        mask = torch.zeros(len(cut), N, dtype=torch.long)
        for i, (p, _) in enumerate(cut):
            values[i, : len(p)] = p
            mask[i, : len(p)] = 1
        return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": grid_hw}
