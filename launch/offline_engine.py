"""Offline use of the minference backend through ``sglang.Engine``: a long prompt, then a short follow-up that
reuses its cached prefix (radix cache), as token ids (the bundled model configs have dummy weights and no
tokenizer, so the generated ids are deterministic but meaningless).

    python launch/offline_engine.py [--model launch/models/llama3.2-1b] [--length 65536]
"""

import argparse
import json
import random
from pathlib import Path

import sglang

MODELS = Path(__file__).resolve().parent / "models"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODELS / "llama3.2-1b")
    parser.add_argument("--length", type=int, default=65536, help="prompt length in tokens")
    parser.add_argument("--config", default='{"min_context": 32768}', help="minference config as JSON")
    args = parser.parse_args()

    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompt = [rng.randrange(1000, vocab) for _ in range(args.length)]
    engine = sglang.Engine(model_path=str(args.model), load_format="dummy", skip_tokenizer_init=True,
                           attention_backend="minference", context_length=args.length + 1024,
                           json_model_override_args=json.dumps({"minference": json.loads(args.config)}))
    try:
        greedy = {"max_new_tokens": 8, "temperature": 0.0}
        first = engine.generate(input_ids=prompt, sampling_params=greedy)  # sparse prefill
        print("turn 1:", first["output_ids"], "cached tokens:", first["meta_info"]["cached_tokens"])
        follow_up = prompt + first["output_ids"] + [rng.randrange(1000, vocab) for _ in range(32)]
        second = engine.generate(input_ids=follow_up, sampling_params=greedy)  # short extend: dense
        print("turn 2:", second["output_ids"], "cached tokens:", second["meta_info"]["cached_tokens"])
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
