"""Hugging Face wrapper of the exported NaViT encoder:

from transformers import AutoModel
model = AutoModel.from_pretrained("OUT_DIR", trust_remote_code=True)
out = model(pixel_values=..., grid_hw=...)     # see navit_encoder.py for the interfaces
"""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from .navit_encoder import CONFIG_KEYS, NaViTEncoderMixin


class NaViTConfig(PretrainedConfig):
    model_type = "navit_encoder"

    def __init__(
        self,
        patch_size=16,
        width=768,
        depth=12,
        heads=12,
        mlp_ratio=4.0,
        qk_norm=True,
        bias=False,
        posemb="learned",
        max_grid=64,
        rope_span=0.0,
        rope_mode="span",
        pool="map",
        ln_eps=1e-6,
        ln_pre=False,
        cls_token=False,
        act="gelu",
        posemb_interp="bicubic",
        fc_norm=False,
        patch_bias=None,
        image_proj="linear",
        embed_dim=512,
        **kwargs,
    ):
        self.patch_size, self.width, self.depth, self.heads = patch_size, width, depth, heads
        self.mlp_ratio, self.qk_norm, self.bias, self.posemb = mlp_ratio, qk_norm, bias, posemb
        self.max_grid, self.pool, self.ln_eps, self.embed_dim = max_grid, pool, ln_eps, embed_dim
        self.rope_span, self.rope_mode, self.ln_pre = rope_span, rope_mode, ln_pre
        self.cls_token, self.act = cls_token, act
        self.posemb_interp, self.fc_norm, self.patch_bias = posemb_interp, fc_norm, patch_bias
        self.image_proj = image_proj
        super().__init__(**kwargs)


class NaViTModel(NaViTEncoderMixin, PreTrainedModel):
    config_class = NaViTConfig
    base_model_prefix = "navit"
    main_input_name = "pixel_values"

    def __init__(self, config: NaViTConfig):
        PreTrainedModel.__init__(self, config)
        self._build({k: getattr(config, k) for k in CONFIG_KEYS})
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors
