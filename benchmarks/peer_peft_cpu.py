"""Anchor on a CPU: PEFT (PyTorch) step time of full / LoRA / DeLoRA / frozen-base training on the small
Llama config of benchmarks/bench.py (hidden 512, 4 layers, 8 heads, 2 KV heads, ff 1408, vocab 8192,
seq 256, batch 8, rank 16 on all seven linears), fp32, AdamW. Prints JSON lines; ratios are what count."""

import json
import time

import torch
from peft import DeloraConfig, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(2)


def run(mode, steps=6, warm=2, batch=8, seq=256):
  torch.manual_seed(0)
  cfg = LlamaConfig(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
  )
  model = LlamaForCausalLM(cfg)
  model.config.use_cache = False
  t = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  if mode == "delora":
    model = get_peft_model(model, DeloraConfig(r=16, delora_lambda=15, target_modules=t))
  elif mode == "lora":
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=t))
  elif mode == "frozen":
    for p in model.parameters():
      p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4)
  x = torch.randint(0, 8192, (batch, seq))

  def step():
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(warm):
    step()
  ts = []
  for _ in range(steps):
    s = time.perf_counter()
    step()
    ts.append(time.perf_counter() - s)
  ts.sort()
  return dict(mode=mode, step_s_median=ts[len(ts) // 2], trainable=sum(p.numel() for p in params))


if __name__ == "__main__":
  res = {}
  for _rep in range(2):
    for m in ["frozen", "lora", "delora", "full"]:
      r = run(m)
      res.setdefault(m, []).append(r["step_s_median"])
      print(json.dumps(r), flush=True)
  med = {m: sorted(v)[len(v) // 2] for m, v in res.items()}
  print(
    json.dumps(
      dict(
        delora_over_lora=med["delora"] / med["lora"],
        delora_over_frozen=med["delora"] / med["frozen"],
        lora_over_frozen=med["lora"] / med["frozen"],
        full_over_frozen=med["full"] / med["frozen"],
      )
    )
  )
