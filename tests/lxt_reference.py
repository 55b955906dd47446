"""Run LXT (the reference AttnLRP / CP-LRP implementation) on a saved model, in its own process.

LXT patches Hugging Face and torchvision classes process-wide and for good, so the tests run it here,
away from the models lrpc traces. Usage: ``python lxt_reference.py SPEC.pt OUT.pt`` where SPEC holds
``kind`` (llama, gpt2, bert, vit), ``config`` (a dict), ``state_dict``, ``inputs``, ``target`` and
``mode`` (attnlrp or cp-lrp). OUT receives the per-token (per-pixel) relevance, in the model's ``dtype``.
"""

from __future__ import annotations

import sys

import torch


def _hf(kind: str, config: dict, mode: str):
    import transformers
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import bert, gpt2, llama

    patches, target_module, cls_name, cfg = {
        "llama": (llama, llama.modeling_llama, "LlamaForCausalLM", transformers.LlamaConfig),
        "gpt2": (gpt2, gpt2.modeling_gpt2, "GPT2LMHeadModel", transformers.GPT2Config),
        "bert": (bert, bert.modeling_bert, "BertForSequenceClassification", transformers.BertConfig),
    }[kind]
    monkey_patch(target_module, patches.attnLRP if mode == "attnlrp" else patches.cp_LRP)
    return getattr(target_module, cls_name)(cfg(**config))  # the class as patched (BERT: LXT's copy)


def main(spec_path: str, out_path: str) -> None:
    spec = torch.load(spec_path, weights_only=False)
    kind, mode, target = spec["kind"], spec["mode"], spec["target"]
    if kind == "vit":
        from lxt.efficient import monkey_patch
        from lxt.efficient.models import vit_torch
        from torchvision.models import vision_transformer

        monkey_patch(vision_transformer, vit_torch.cp_LRP)
        model = vision_transformer.VisionTransformer(**spec["config"])
    else:
        model = _hf(kind, spec["config"], mode)
    model.load_state_dict(spec["state_dict"])
    model = model.to(spec["dtype"]).eval()
    if kind == "vit":
        x = spec["inputs"].to(spec["dtype"]).requires_grad_()
        logits = model(x)
    else:
        embed = model.get_input_embeddings()(spec["inputs"]).detach().requires_grad_()
        logits = model(inputs_embeds=embed, attention_mask=torch.ones_like(spec["inputs"])).logits
        x = embed
    scores = logits[:, -1] if logits.dim() == 3 else logits
    scores.gather(-1, target[:, None]).sum().backward()
    relevance = (x * x.grad).detach()
    torch.save(relevance if kind == "vit" else relevance.sum(-1), out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
