"""Build the small byte-level BPE tokenizer used by the smoke recipe and the unit tests.

Trained on STS Benchmark train sentences (../shared/data/stsbenchmark, CC BY-SA 4.0 scores; texts from their
sources) so tiny random models see realistic token statistics without downloading anything.
Usage: python scripts/make_tiny_tokenizer.py [--shared ../shared/data] [--out recipes/assets/tiny-tokenizer]
"""

import argparse
import csv
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="recipes/assets/tiny-tokenizer")
    ap.add_argument("--vocab", type=int, default=1024)
    args = ap.parse_args()
    texts = []
    with open(os.path.join(args.shared, "stsbenchmark", "sts-train.csv"), encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts.extend(row[5:7])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|im_start|>")
    tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(args.out)
    print(f"saved {args.out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
