"""Training NVLM-D, -X and -H through the paper's two stages (spec section 7)."""
