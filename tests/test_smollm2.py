"""The real embedded model on a few hundred tokens (GGUF → safetensors conversion included)."""

import json

import numpy as np
import torch

from pipeline.cache import Cache
from pipeline.models import EMBEDDED_MODEL, embedded_model_folder, load_model, run_hooks
from stages import harvest
from tests.conftest import PYDOC, make_config


def test_smollm2_harvest_matches_a_fresh_forward(tmp_path):
    cfg = make_config(tmp_path, f"harvest.model={EMBEDDED_MODEL}", "harvest.hooks=[\"blocks.2.hook_resid_pre\"]",
                      "harvest.context_size=128", "harvest.n_tokens=384", "harvest.dtype=float16",
                      "harvest.batch_size=3")
    harvest.run(cfg)
    assert (embedded_model_folder() / "model.safetensors").is_file()
    cache = Cache.open(cfg.harvest.cache_dir)
    assert cache.meta["d_model"] == 576 and cache.meta["d_vocab"] == 49152 and cache.n_seq == 3
    lm = load_model(EMBEDDED_MODEL, "cpu")
    hook = "blocks.2.hook_resid_pre"
    tokens = torch.from_numpy(cache.tokens()).long()
    assert (tokens[:, 0] == lm.bos_token_id).all()
    first_doc = json.loads(PYDOC.read_text().splitlines()[0])["text"]
    ids = lm.tokenizer(first_doc, add_special_tokens=False)["input_ids"]
    assert len(ids) > 127 and tokens[0, 1:].tolist() == ids[:127]  # the window is the real text's tokens
    fresh = run_hooks(lm, tokens, [hook])[hook].half().float().numpy()
    np.testing.assert_allclose(cache.acts(hook).astype(np.float32), fresh, rtol=1e-3, atol=1e-2)
    u = cache.unigram(hook)
    t = torch.tensor([42, 1000])
    ref = run_hooks(lm, torch.stack([torch.full_like(t, lm.bos_token_id), t], 1), [hook])[hook][:, 1]
    torch.testing.assert_close(u[t], ref, rtol=1e-4, atol=1e-4)
