"""Anchor for the GPU benchmark: PEFT (PyTorch) full / LoRA / DeLoRA / frozen-base training
step time and peak memory on a Llama-style decoder with random weights, bf16, AdamW.
Usage on a CUDA machine: python benchmarks/peer_peft_torch.py [1b|small] [batch] [seq];
writes $OUT/peer_<size>.json if OUT is set."""

import json
import os
import sys

import torch
from peft import DeloraConfig, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def cfg(name):
  if name == "1b":
    return LlamaConfig(
      vocab_size=32000,
      hidden_size=2048,
      intermediate_size=5632,
      num_hidden_layers=22,
      num_attention_heads=32,
      num_key_value_heads=4,
      max_position_embeddings=2048,
    )
  if name == "small":
    return LlamaConfig(
      vocab_size=32000,
      hidden_size=768,
      intermediate_size=2048,
      num_hidden_layers=12,
      num_attention_heads=12,
      num_key_value_heads=12,
      max_position_embeddings=2048,
    )
  raise SystemExit(name)


def run(mode, size, batch, seq, steps=10, warm=3, compile_=False):
  torch.manual_seed(0)
  model = LlamaForCausalLM(cfg(size)).to("cuda", dtype=torch.bfloat16)
  model.config.use_cache = False
  targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  if mode == "delora":
    model = get_peft_model(model, DeloraConfig(r=16, delora_lambda=15, target_modules=targets))
  elif mode == "lora":
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
  elif mode == "frozen":
    for p in model.parameters():
      p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # keep a graph; near-zero extra
  params = [p for p in model.parameters() if p.requires_grad]
  ntrain = sum(p.numel() for p in params)
  opt = torch.optim.AdamW(params, lr=1e-4)
  if compile_:
    model = torch.compile(model)
  x = torch.randint(0, 32000, (batch, seq), device="cuda")

  def step():
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(warm):
    step()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(steps):
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    s.record()
    step()
    e.record()
    torch.cuda.synchronize()
    times.append(s.elapsed_time(e))
  times.sort()
  return dict(
    mode=mode,
    size=size,
    batch=batch,
    seq=seq,
    compile=compile_,
    trainable=ntrain,
    step_ms_median=times[len(times) // 2],
    step_ms_min=times[0],
    peak_gib=torch.cuda.max_memory_allocated() / 2**30,
  )


if __name__ == "__main__":
  import peft
  import transformers

  print(
    json.dumps(
      dict(
        torch=torch.__version__,
        peft=peft.__version__,
        transformers=transformers.__version__,
        gpu=torch.cuda.get_device_name(),
      )
    ),
    flush=True,
  )
  size = sys.argv[1] if len(sys.argv) > 1 else "1b"
  batch, seq = int(sys.argv[2]) if len(sys.argv) > 2 else 4, int(sys.argv[3]) if len(sys.argv) > 3 else 1024
  res = []
  for mode in ["full", "lora", "delora", "frozen"]:
    r = run(mode, size, batch, seq)
    res.append(r)
    print(json.dumps(r), flush=True)
    torch.cuda.empty_cache()
  out = os.environ.get("OUT")
  if out:
    json.dump(res, open(os.path.join(out, f"peer_{size}.json"), "w"), indent=1)
