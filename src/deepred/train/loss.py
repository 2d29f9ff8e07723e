"""The loss of the fast and lean profiles: the output layer on the supervised positions only, and padding-free
batches cut at example boundaries to a token budget."""

from __future__ import annotations


def supervised_loss(head, hidden, targets, kind: str, cpu_bf16: bool):
    """Summed cross-entropy of `targets` from the final hidden states of the supervised positions only.

    The output layer is most of the cost of a step with a 150k vocabulary; scoring only the reply tokens instead of
    every position (system prompt and question included) is the same loss for a fraction of the work.
    """
    import torch

    hidden = hidden.to(head.weight.dtype)  # a bf16 model on CUDA can hand back the final norm's float32
    if kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)
        return loss[0] if isinstance(loss, tuple) else loss
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):  # as accelerate runs the body
        logits = head(hidden)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def split_packed_batch(inputs: dict, max_tokens: int | None) -> list[dict]:
    """A padding-free batch (one row of concatenated examples) cut at example boundaries into pieces of at most
    `max_tokens` tokens (an example longer than that is a piece of its own). Other batches are returned whole."""
    ids = inputs["input_ids"]
    if not max_tokens or "position_ids" not in inputs or ids.shape[0] != 1 or ids.shape[1] <= max_tokens:
        return [inputs]
    starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
    total = ids.shape[1]
    pieces, lo = [], 0
    for start, end in zip(starts, starts[1:] + [total]):
        if end - lo > max_tokens and start > lo:  # this example would overflow the piece: start a new one
            pieces.append((lo, start))
            lo = start
    pieces.append((lo, total))
    return [packed_piece(inputs, lo, hi) for lo, hi in pieces]


def packed_piece(inputs: dict, lo: int, hi: int) -> dict:
    import torch

    piece = {key: inputs[key][:, lo:hi] for key in ("input_ids", "labels", "position_ids") if key in inputs}
    if "cu_seq_lens_q" in inputs:  # the varlen kernels' sequence boundaries, as TRL's collator builds them
        starts = (piece["position_ids"][0] == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([hi - lo], device=starts.device)]).to(torch.int32)
        piece["cu_seq_lens_q"] = piece["cu_seq_lens_k"] = cu
        piece["max_length_q"] = piece["max_length_k"] = int(cu.diff().max())
    if "seq_idx" in inputs:
        piece["seq_idx"] = inputs["seq_idx"][:, lo:hi] - inputs["seq_idx"][0, lo]
    return piece
