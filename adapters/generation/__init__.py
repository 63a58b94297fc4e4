"""Generation on a model with or without adapters: one decoding loop whose rows each sample,
stop and stream on their own (decode.py), and the incremental detokenizer (detok.py).

Below serving (its engine and registry) and training (GRPO's rollouts use the live adapter)."""
