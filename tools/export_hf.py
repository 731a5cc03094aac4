#!/usr/bin/env python3
"""Export a training checkpoint as a Hugging Face model folder in its family's layout.

Writes config.json, model.safetensors (tensor names as in the LLaDA-8B checkpoints, or
as DistilBertForMaskedLM's) and the tokenizer files: for LLaDA tokenizer.json and a
tokenizer_config.json written here; for DistilBERT vocab.txt, tokenizer.json and
tokenizer_config.json copied from the folder of --tokenizer (tools/train_wordpiece.py
writes all three). The tied MLM decoder of DistilBERT is not stored, as transformers
leaves tied tensors out of safetensors files. Optional --shards N splits the weights
into model-0000K-of-0000N.safetensors files with a model.safetensors.index.json, as
large checkpoints ship.

Usage: export_hf.py --checkpoint runs/x/checkpoint.pt --tokenizer T.json --out models/x
"""

import argparse
import json
import os
import shutil

import torch

import llada_ref


def tokenizer_config(config):
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_sequence_length"],
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mdm_mask|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def export(state, config, tokenizer, out, dtype, shards):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    if config["model_type"] == "llada":
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config(config), f, indent=2)
            f.write("\n")
    if config["model_type"] == "distilbert":
        src = os.path.dirname(os.path.abspath(tokenizer))
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
            if src != os.path.abspath(out):
                shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    elif os.path.abspath(tokenizer) != os.path.abspath(os.path.join(out, "tokenizer.json")):
        shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.json"))
    names = sorted(state)
    if shards <= 1:
        llada_ref.save_safetensors(os.path.join(out, "model.safetensors"), state, dtype)
        return
    weight_map, per = {}, (len(names) + shards - 1) // shards
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        llada_ref.save_safetensors(os.path.join(out, fname), {n: state[n] for n in part}, dtype)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--shards", type=int, default=1)
    args = ap.parse_args()
    ck = torch.load(args.checkpoint, map_location="cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = dict(ck["config"])
    config["torch_dtype"] = "bfloat16" if args.dtype == "bf16" else "float32"
    export(ck["state"], config, args.tokenizer, args.out, dtype, args.shards)
    print(f"exported step {ck['step']} ({ck['tokens']} tokens, validation loss "
          f"{ck['val_loss']:.4f}) to {args.out}")


if __name__ == "__main__":
    main()
