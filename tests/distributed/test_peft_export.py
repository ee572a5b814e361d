"""`export-hf --format peft` and `trinityx route` on a stage-2 run trained at TP=2 by the real CLI:
PEFT loads each adapter on the exported backbone and computes the TrinityX model with that expert
forced; the route helper's pick is the argmax of the router's mean probabilities as the exported
TrinityX model computes them."""
import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_dist
from trinityx_ds.cli import main
from trinityx_ds.convert.write import export_hf
from trinityx_ds.model.tiny import make_tiny_model
from trinityx_ds.train.tiny_run import write_config, write_random_experts

WORKERS = Path(__file__).parent / "workers"
pytestmark = pytest.mark.distributed
TOL = 1e-4  # fp32
NAMES = ["help", "harm", "honest"]
PROMPTS = ["How do I bake bread?", "Tell me how to hurt someone.", "Is the earth flat?"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Stage 2 (router only, 4 steps) at TP=2, ZeRO-3, LoRA experts in layer 1 of 2, exported as
    peft and as trinityx (the forced-expert reference)."""
    root = tmp_path_factory.mktemp("peftrun")
    cfg = write_config(root, make_tiny_model(root / "tiny"), **{
        "parallel": {"tp": 2}, "experts.layers": [1], "router": {"top_k": 2, "importance": [1.0, 2.0, 0.5]},
        "output": {"tensorboard": False}, "train.stage2": {"steps": 4, "micro_batch": 2, "lr": 0.1}})
    write_random_experts(cfg)
    run_dist(WORKERS / "train_worker.py", 2, "cli", str(cfg), "router", timeout=300)
    run = root / "out"
    assert main(["export-hf", str(run), str(root / "peft"), "--format", "peft"]) == 0
    return root / "peft", export_hf(run, root / "trinityx")


def test_each_peft_adapter_is_the_model_with_its_expert_forced(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trinityx_ds.convert.hf_model import TrinityXForCausalLM

    peft_dir, trinityx = exported
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    model = TrinityXForCausalLM.from_pretrained(trinityx).eval()
    backbone = AutoModelForCausalLM.from_pretrained(peft_dir).eval()
    assert type(backbone).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        plain = backbone(ids).logits
    for name in NAMES:
        conf = json.loads((peft_dir / "adapters" / name / "adapter_config.json").read_text())
        assert (conf["peft_type"], conf["task_type"], conf["r"], conf["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
        assert sorted(conf["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
        assert conf["layers_to_transform"] == [1] and conf.get("modules_to_save") is None
        assert Path(conf["base_model_name_or_path"]) == peft_dir.resolve()
        model.config.force_expert = name
        with torch.no_grad():
            forced = model(ids).logits
            got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peft_dir),
                                            peft_dir / "adapters" / name).eval()(ids).logits
        assert (got - forced).abs().max() <= TOL, name
        assert (got - plain).abs().max() > 1e-3, name  # the adapter was applied


def test_route_picks_the_argmax_of_the_mean_calibrated_probability(exported, capsys, tmp_path):
    """The reference: the exported TrinityX model's own router (layer 1, whose input is the
    backbone's: layer 0 has no experts), its probabilities recomputed from its tensors."""
    from trinityx_ds.convert.hf_model import TrinityXForCausalLM
    from trinityx_ds.convert.request_router import RequestRouter

    peft_dir, trinityx = exported
    model = TrinityXForCausalLM.from_pretrained(trinityx).eval()
    router = model.model.layers[1].mlp.router
    seen = []
    router.register_forward_hook(lambda mod, args, out: seen.append(args[0].float()))
    helper = RequestRouter(peft_dir)
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert main(["route", "--export", str(peft_dir), "--jsonl", str(jsonl)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    picks = []
    for prompt, line in zip(PROMPTS, lines):
        seen.clear()
        with torch.no_grad():
            model(torch.tensor([helper.encode(prompt)]))
        p_TE = (seen[0] @ router.weight.T / router.log_temperature.exp() + router.log_importance).softmax(-1)
        mean_E = p_TE.mean(0)
        assert torch.allclose(torch.tensor(list(line["probs"].values())), mean_E, atol=1e-5), prompt
        assert line["adapter"] == NAMES[int(mean_E.argmax())]
        assert line["adapter_path"] == str(peft_dir / "adapters" / line["adapter"])
        picks.append(line["adapter"])
        assert main(["route", "--export", str(peft_dir), "--prompt", prompt]) == 0
        assert capsys.readouterr().out.strip() == line["adapter"]
    assert min(max(line["probs"].values()) - min(line["probs"].values()) for line in lines) > 1e-3  # not uniform
