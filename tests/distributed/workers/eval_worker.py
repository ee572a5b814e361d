"""Worker for the evaluation tests. argv: MODE ...

cli ARGS_JSON : `trinityx eval` with these options, in place on this torchrun job (no --nproc).
checks RUN_DIR HF_DIR : on one process, the loaded models against transformers and each other:
    continuation log-probs and greedy generations of a plain HF folder ("backbone") vs transformers,
    the run's "backbone" variant vs the plain folder, the run's "trinityx" router temperatures, and
    the routers and scores of the other variants.
"""
import json
import sys

from tests.dist import worker_setup, write_result

worker_setup()

import torch  # noqa: E402

from trinityx_ds.eval.runner import main  # noqa: E402

mode = sys.argv[1]
if mode == "cli":
    sys.exit(main(json.loads(sys.argv[2])))

from transformers import AutoModelForCausalLM  # noqa: E402

from trinityx_ds.eval.lm import load_lm  # noqa: E402
from trinityx_ds.eval.loglik import Request, encode, sequence_logprob  # noqa: E402
from trinityx_ds.parallel.groups import destroy_parallel  # noqa: E402

run_dir, hf_dir = sys.argv[2], sys.argv[3]
requests = [Request([{"role": "user", "content": "Give three tips for staying healthy."}], "Eat well and sleep."),
            Request([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "What is 2 + 2?"}], "4"),
            Request([{"role": "user", "content": "Name a colour."}], "Blue")]
plain = load_lm(hf_dir, "backbone", batch_size=2)
ours = plain.logprobs(requests)
single = sequence_logprob(plain.model, plain.tokenizer, *requests[1], max_len=plain.max_len)
gen_ours = plain.generate([r.prompt for r in requests], max_new_tokens=6)

hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
tok = plain.tokenizer
ref, gen_ref = [], []
with torch.no_grad():
    for r in requests:
        ids, n = encode(tok, r, plain.max_len, plain.chat_template)
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
        ref.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids))))
        prompt, _ = encode(tok, Request(r.prompt, ""), plain.max_len, plain.chat_template)
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        out = out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        gen_ref.append(tok.decode(out, skip_special_tokens=True).strip())
run_backbone = load_lm(run_dir, "backbone", batch_size=2).logprobs(requests)
trinityx = load_lm(run_dir, "trinityx")
variants = {}
for name in ("expert:help", "uniform", "h3fusion"):
    lm = load_lm(run_dir, name, batch_size=2)
    variants[name] = {"ll": lm.logprobs(requests),
                      "router": [[round(b.router.temperature, 6), b.router.weight.abs().sum().item(),
                                  b.router.log_importance.tolist(), b.router.top_k] for b in lm.blocks]}
write_result({"variants": variants, "ours": ours, "ref": ref, "gen_ours": gen_ours, "gen_ref": gen_ref,
              "run_backbone": run_backbone, "single": single,
              "temperatures": trinityx.router_state()[1]})
destroy_parallel()
