"""`qlora convert --verify`: the same probe through base + adapter in PyTorch/PEFT and in MLX.

Heavy frameworks are imported here only. Both sides run the unquantized base in float32, so the
only differences left are float32 rounding; a wrong conversion (a missed transpose, a wrong scale)
misses by the size of the adapter's effect.
"""

from __future__ import annotations

from pathlib import Path

PROBE = "[INST] Explain in one sentence why the sky is blue. [/INST] Because"


def probe_ids(base_dir: str | Path) -> list[int]:
    from common.data.tokenize import ChatTokenizer, find_tokenizer_file

    tokenizer = ChatTokenizer(find_tokenizer_file(base_dir))
    return [tokenizer.bos_id, *tokenizer._instruct.tokenizer.encode(PROBE, bos=False, eos=False)]


def peft_logits(base_dir: str | Path, peft_dir: str | Path, ids: list[int]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(model, str(peft_dir)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def mlx_logits(base_dir: str | Path, mlx_dir: str | Path, ids: list[int]):
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_map
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load

    model, _ = load(str(base_dir))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    load_adapters(model, str(mlx_dir))
    model.eval()
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    return np.array(logits)


def max_logit_difference(base_dir, peft_dir, mlx_dir) -> float:
    import numpy as np

    ids = probe_ids(base_dir)
    return float(np.abs(peft_logits(base_dir, peft_dir, ids) - mlx_logits(base_dir, mlx_dir, ids)).max())
