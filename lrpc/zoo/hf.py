"""Zoo entries from Hugging Face ``transformers``: tiny random-weight models built offline from configs
(``from_config``, never ``from_pretrained``), hidden size 32-64, two layers, vocabularies of ~100-128,
each with a realistic example call (token ids with a padded attention mask, pixel values, audio).

``initializer_range=0.1`` (the default 0.02 makes attention nearly uniform, so the attention rules
would barely matter). Encoders are padded on the right, decoders on the left, as tokenizers do.
"""

from __future__ import annotations

from typing import Any

import torch

from . import Built, register

VOCAB = 128
BATCH, SEQ = 2, 8
INIT = 0.1  # initializer_range


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def _build(model_cls: Any, config: Any) -> Any:
    """The model from its config (random weights, seeded), in eval mode, with torch's SDPA attention
    where the architecture has it (what ``from_pretrained`` picks by default)."""
    torch.manual_seed(0)
    return model_cls._from_config(config).eval()


def _tokens(vocab: int = VOCAB, *, low: int = 3, seq: int = SEQ, pad: str = "right", pad_id: int = 0) -> dict:
    """``input_ids`` and ``attention_mask`` for a batch of two; the second sample is padded by two tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(low, vocab, (BATCH, seq), generator=g)
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    padded = slice(seq - 2, seq) if pad == "right" else slice(0, 2)
    mask[1, padded] = 0
    ids[1, padded] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def _decoder_ids(vocab: int = VOCAB, start: int = 0, seq: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (BATCH, seq), generator=g)
    ids[:, 0] = start
    return ids


def _randn(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- vision


@register("siglip2-vision", "vision", paper=True, needs="transformers", attention=True)
def siglip2_vision() -> Built:
    """SigLIP's vision tower (``SiglipVisionModel``: conv patch embedding, learned position embedding,
    pre-norm encoder, attention-pooling head). SigLIP 2 shares this tower except its NaFlex patch
    embedding, whose position grid is resized to each image's ``spatial_shapes`` read with ``.item()``:
    ``torch.export`` cannot trace that (data-dependent interpolation size), so the SigLIP 1 tower stands
    in. Weights: SigLIP's own init (Xavier-uniform, not ``initializer_range``), already non-uniform
    attention at this width. Output: the last hidden state (B, patches, hidden)."""
    _quiet()
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_channels=3, image_size=32, patch_size=8,
    )
    model = _build(SiglipVisionModel, config)
    return model, (), {"pixel_values": _randn(BATCH, 3, 32, 32)}


@register("convnextv2-hf", "vision", needs="transformers")
def convnextv2_hf() -> Built:
    """ConvNeXt V2: depthwise convolutions, channels-last layer norms and Global Response Normalization,
    whose statistic transformers computes as a spectral norm (``torch.linalg.norm(x, ord=2, dim=(1, 2))``,
    an SVD in the graph; held constant like a normalizer's)."""
    _quiet()
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    config = ConvNextV2Config(
        num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10,
        initializer_range=INIT,
    )
    return _build(ConvNextV2ForImageClassification, config), (), {"pixel_values": _randn(BATCH, 3, 32, 32)}


@register("vit-hf", "vision", needs="transformers", attention=True)
def vit_hf() -> Built:
    _quiet()
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_labels=10, initializer_range=INIT,
    )
    model = _build(ViTForImageClassification, config)
    return model, (), {"pixel_values": _randn(BATCH, 3, 32, 32)}


# ------------------------------------------------------------------------------------------ audio


@register("wav2vec2", "audio", paper=True, needs="transformers", attention=True)
def wav2vec2() -> Built:
    """Wav2Vec2 (base layout: group-norm feature encoder, weight-normed convolutional position
    embedding, post-norm encoder) with a sequence-classification head; 1600 samples of raw audio."""
    _quiet()
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 2), conv_kernel=(10, 4, 2),  # 1600 samples -> 39 frames
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        classifier_proj_size=16, num_labels=4, initializer_range=INIT,
    )
    model = _build(Wav2Vec2ForSequenceClassification, config)
    return model, (), {"input_values": _randn(BATCH, 1600)}


@register("whisper", "audio", paper=True, needs="transformers", attention=True)
def whisper() -> Built:
    """Whisper encoder-decoder: log-mel features (16 bins, 32 frames) and decoder token ids."""
    _quiet()
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=32, init_std=INIT,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    )
    model = _build(WhisperForConditionalGeneration, config)
    features = _randn(BATCH, 16, 2 * config.max_source_positions)  # the encoder wants exactly 2 x positions
    return model, (), {"input_features": features, "decoder_input_ids": _decoder_ids(start=1)}


# ------------------------------------------------------------------------------------ text encoders


@register("bert", "text", needs="transformers", attention=True)
def bert() -> Built:
    _quiet()
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, initializer_range=INIT,
    )
    return _build(BertForSequenceClassification, config), (), _tokens()


@register("roberta", "text", paper=True, needs="transformers", attention=True)
def roberta() -> Built:
    _quiet()
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=1, num_labels=3, initializer_range=INIT,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    return _build(RobertaForSequenceClassification, config), (), _tokens(pad_id=1)


@register("distilbert", "text", needs="transformers", attention=True)
def distilbert() -> Built:
    _quiet()
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
        num_labels=3, initializer_range=INIT,
    )
    return _build(DistilBertForSequenceClassification, config), (), _tokens()


@register("deberta-v3", "text", needs="transformers", attention=True)
def deberta_v3() -> Built:
    """DeBERTa-v3 layout (``DebertaV2``): disentangled attention, content-to-position and position-to-content
    scores gathered from shared relative-position embeddings in log buckets, no absolute positions."""
    _quiet()
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
        max_relative_positions=-1, type_vocab_size=0, num_labels=3, initializer_range=INIT,
    )
    return _build(DebertaV2ForSequenceClassification, config), (), _tokens()


# ------------------------------------------------------------------------------------ text decoders
# Explained output: the logits (B, T, V); lrpc explains the last position by default.


@register("gpt2", "text", paper=True, needs="transformers", attention=True)
def gpt2() -> Built:
    _quiet()
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=INIT,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )
    return _build(GPT2LMHeadModel, config), (), _tokens(pad="left")


@register("llama", "text", paper=True, needs="transformers", attention=True)
def llama() -> Built:
    """Llama 3.2 layout: grouped-query attention, llama3-scaled rope, tied input/output embeddings."""
    _quiet()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500000.0, tie_word_embeddings=True, initializer_range=INIT, use_cache=False,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _build(LlamaForCausalLM, config), (), _tokens(pad="left")


@register("mistral", "text", needs="transformers", attention=True)
def mistral() -> Built:
    """Mistral: grouped-query attention with a sliding window (4 tokens, shorter than the sequence)."""
    _quiet()
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=4,
        initializer_range=INIT, use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _build(MistralForCausalLM, config), (), _tokens(pad="left")


@register("bloom", "text", needs="transformers", attention=True)
def bloom() -> Built:
    """BLOOM: ALiBi (a per-head linear bias on the scores from the positions, added by ``baddbmm``) instead
    of position embeddings, an embedding layer norm. Padded on the right, unlike the other decoders: in
    float64 (the zoo tests' DynamicLRP check) transformers' BLOOM returns NaN logits for a left-padded
    sample, whose first queries see no key."""
    _quiet()
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, initializer_range=INIT, use_cache=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _build(BloomForCausalLM, config), (), _tokens(pad="right")


@register("gemma3", "text", paper=True, needs="transformers", attention=True)
def gemma3() -> Built:
    """Gemma 3 text decoder: sliding-window and global layers (pattern 2), q/k RMS norms, sandwich
    norms, GELU-tanh gated MLP, scaled embeddings, logit soft-capping off (as released)."""
    _quiet()
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=4, sliding_window_pattern=2, max_position_embeddings=128,
        initializer_range=INIT, use_cache=False, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return _build(Gemma3ForCausalLM, config), (), _tokens(pad="left")


@register("qwen3", "text", paper=True, needs="transformers", attention=True)
def qwen3() -> Built:
    """Qwen3 dense decoder: grouped-query attention with q/k RMS norms, tied embeddings (as the small
    ones have)."""
    _quiet()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=INIT, use_cache=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _build(Qwen3ForCausalLM, config), (), _tokens(pad="left")


@register("mixtral", "text", needs="transformers", attention=True)
def mixtral() -> Built:
    """Mixtral: a sparse mixture-of-experts decoder, top-2 softmax routing over 4 SwiGLU experts per layer
    (transformers 4.x loops over the experts with data-dependent token counts: unbacked sizes in export),
    grouped-query attention."""
    _quiet()
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
        initializer_range=INIT, use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _build(MixtralForCausalLM, config), (), _tokens(pad="left")


@register("mamba", "ssm", paper=True, needs="transformers")
def mamba() -> Built:
    """Mamba (v1): gated selective-scan blocks with a causal depthwise convolution (the sequential scan
    of transformers' reference path, unrolled over the sequence by export)."""
    _quiet()
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        initializer_range=INIT, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return _build(MambaForCausalLM, config), (), _tokens(pad="left")


@register("rwkv", "ssm", needs="transformers")
def rwkv() -> Built:
    """RWKV (v4): time-mixing WKV recurrence in transformers' pure-PyTorch loop, which writes each step
    into a buffer in place (``aten.copy`` in the graph). ``rescale_every=0``: with rescaling, the model
    divides its own weights in place on its first eval call (lrpc computes with the divided weights and
    warns that the forward writes them, see test_api)."""
    _quiet()
    from transformers import RwkvConfig, RwkvForCausalLM

    config = RwkvConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64,
        context_length=16, rescale_every=0, use_cache=False, initializer_range=INIT,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return _build(RwkvForCausalLM, config), (), {"input_ids": _tokens()["input_ids"]}


# ------------------------------------------------------------------------------------------ seq2seq


@register("flan-t5", "seq2seq", paper=True, needs="transformers", attention=True)
def flan_t5() -> Built:
    """T5 v1.1 / Flan-T5 layout: gated-GELU feed-forward, RMS layer norms, relative position buckets,
    untied output head. T5 initializes from ``initializer_factor`` (d_model**-0.5 scales), not
    ``initializer_range``; its attention is not scaled by 1/sqrt(d), so it is far from uniform."""
    _quiet()
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = _build(T5ForConditionalGeneration, config)
    return model, (), {**_tokens(), "decoder_input_ids": _decoder_ids(start=0)}


@register("pix2struct", "seq2seq", paper=True, needs="transformers", attention=True)
def pix2struct() -> Built:
    """Pix2Struct: a ViT over variable-resolution flattened patches (row and column index in the first
    two features, learned 2-d position embeddings) and a T5-style text decoder."""
    _quiet()
    from transformers import Pix2StructConfig, Pix2StructForConditionalGeneration

    patch, rows, cols = 4, 3, 4
    text = {
        "vocab_size": VOCAB, "hidden_size": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "use_cache": False,
    }
    vision = {
        "hidden_size": 32, "patch_embed_hidden_size": 3 * patch * patch, "d_ff": 64, "d_kv": 8,
        "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": patch, "seq_len": 16,
    }
    config = Pix2StructConfig(text_config=text, vision_config=vision, initializer_range=INIT)
    model = _build(Pix2StructForConditionalGeneration, config)
    # Flattened patches as the image processor makes them: [row (1-based), column (1-based), pixels...],
    # padded with zero rows up to max_patches; the attention mask (float, as the processor returns it)
    # marks the real patches. 12 patches of a 3 x 4 grid, padded to 16.
    max_patches = 16
    n = rows * cols
    pixels = _randn(BATCH, max_patches, 3 * patch * patch)
    r = torch.arange(n) // cols + 1
    c = torch.arange(n) % cols + 1
    patches = torch.zeros(BATCH, max_patches, 2 + 3 * patch * patch)
    patches[:, :n, 0], patches[:, :n, 1], patches[:, :n, 2:] = r.float(), c.float(), pixels[:, :n]
    mask = torch.zeros(BATCH, max_patches)
    mask[:, :n] = 1.0
    decoder_ids = _decoder_ids(start=0)
    return model, (), {"flattened_patches": patches, "attention_mask": mask, "decoder_input_ids": decoder_ids}
