"""The DeepSpeed recipe runs as documented (one process, a few steps) and swaps its MoE layers to BASE."""
import json
import os
import subprocess
import sys

from multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_gpt_recipe_runs_and_learns(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    proc = subprocess.run(
        [sys.executable, "examples/deepspeed/train_gpt.py", "--deepspeed_config", "configs/deepspeed/cpu_smoke.json",
         "--steps", "12", "--eval-every", "12", "--data", str(text)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FFN layers: ['BaseMoE', 'Sequential']" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 12 and result["final_val_loss"] < 4.5  # from ln(256) = 5.55
