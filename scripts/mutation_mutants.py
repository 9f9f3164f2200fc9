"""The fixed list of mutants that ``scripts/mutation_check.py`` applies, one at a time, to a copy
of ``src/lorakit``.

Each mutant is one plausible single-line bug: the file (relative to ``src/lorakit``), the exact
snippet it replaces (which must occur exactly once in that file, so the list stays in sync with the
code), the replacement, one line saying what the bug is, and the pytest node ids expected to kill
it (they pass on the unmutated code and fail with the bug in). Keep selections small: each mutant
runs its selection from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to src/lorakit
    old: str  # must occur exactly once in the file
    new: str
    bug: str  # one line: the plausible bug this stands for
    tests: tuple[str, ...]  # pytest node ids expected to kill it


T = "tests/"
MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ layers
    Mutant(
        "scaling-ignores-rank", "config.py",
        "return alpha / math.sqrt(r) if self.use_rslora else alpha / r",
        "return alpha / math.sqrt(r) if self.use_rslora else alpha",
        "LoRA scale s = alpha instead of alpha / r (plain LoRA)",
        (T + "test_layers.py::test_linear_matches_formula",),
    ),
    Mutant(
        "fused-forward-drops-scale", "functional.py",
        "return y.addmm_(t, B.T, alpha=scaling)",
        "return y.addmm_(t, B.T)",
        "the fused linear forward adds t Bᵀ without the scale s",
        (T + "test_layers.py::test_linear_matches_formula",),
    ),
    Mutant(
        "b-init-not-zero", "layers/base.py",
        "nn.init.zeros_(self.lora_B[name])",
        "init_lora_a(self.lora_B[name], init, self.r[name])",
        "B initialised like A (kaiming) instead of zero: a fresh adapter changes the output",
        (T + "test_injection.py::test_fresh_adapter_is_bitwise_identity",),
    ),
    Mutant(
        "dropout-module-ignores-p", "layers/base.py",
        "(Dropout(dropout) if dropout > 0 else nn.Identity())",
        "(Dropout(0.1) if dropout > 0 else nn.Identity())",
        "the adapter's input dropout is always 0.1, whatever the config's dropout",
        (T + "test_layers.py::test_dropout_drops_the_configured_fraction_of_adapter_inputs",),
    ),
    Mutant(
        "dropout-mask-fixed-rate", "functional.py",
        "return keep_mask(x2.shape, p, x2.device)",
        "return keep_mask(x2.shape, 0.1, x2.device)",
        "the fused kernel's dropout mask is drawn at 0.1 while the 1/(1-p) scale uses p",
        (T + "test_layers.py::test_dropout_drops_the_configured_fraction_of_adapter_inputs",),
    ),
    Mutant(
        "conv-ignores-stride", "layers/conv.py",
        "t = self.conv(h.to(A.dtype), A, None, base.stride, base.padding, base.dilation) * self.scaling[name]",
        "t = self.conv(h.to(A.dtype), A, None, 1, base.padding, base.dilation) * self.scaling[name]",
        "the conv adapter's A convolution ignores the base layer's stride",
        (T + "test_layers.py::test_conv2d_matches_merged_weight",),
    ),
    Mutant(
        "conv-delta-unscaled", "layers/conv.py",
        "return blocks.reshape(out, *A.shape[1:]) * scaling",
        "return blocks.reshape(out, *A.shape[1:])",
        "conv ΔW (merge, offline merge, combine) forgets the scale s: merged ≠ unmerged when s ≠ 1",
        (T + "test_mutation_gaps.py::test_conv2d_merge_equals_forward_when_the_scale_is_not_one",),
    ),
    Mutant(
        "embedding-delta-layout", "layers/embedding.py",
        "return cls.factor_delta(A, B, scaling).T",
        "return cls.factor_delta(A, B, scaling)",
        "embedding ΔW left [dim, num] instead of the table's [num, dim] layout",
        (T + "test_injection.py::test_merge_and_unload_gives_plain_model",),
    ),
    # ------------------------------------------------------------------ merging
    Mutant(
        "merge-sign", "layers/base.py",
        "self.add_to_base(self.merge_delta(name), sign=1.0)",
        "self.add_to_base(self.merge_delta(name), sign=-1.0)",
        "merge subtracts ΔW instead of adding it",
        (T + "test_injection.py::test_merge_unmerge_and_state",),
    ),
    Mutant(
        "unmerge-sign", "layers/base.py",
        "self.add_to_base(self.unmerge_delta(name), sign=-1.0)",
        "self.add_to_base(self.unmerge_delta(name), sign=1.0)",
        "unmerge adds ΔW a second time instead of subtracting it",
        (T + "test_injection.py::test_merge_unmerge_and_state",),
    ),
    Mutant(
        "dora-norm-cross-term-sign", "layers/dora.py",
        "squared = positive + 2 * scaling * cross",
        "squared = positive - 2 * scaling * cross",
        "DoRA's expanded weight norm subtracts the cross term ⟨W0, ΔW⟩ instead of adding it",
        (T + "test_dora.py::test_row_norms_equal_the_direct_norm_including_cancelling_rows",),
    ),
    Mutant(
        "dora-merge-unscaled-delta", "layers/dora.py",
        "return (fw - 1) * W0 + fw * delta",
        "return (fw - 1) * W0 + delta",
        "a DoRA merge adds ΔW without the magnitude's rescaling",
        (T + "test_parity_grid.py::test_merge_unmerge_and_unload",),
    ),
    Mutant(
        "dora-cache-ignores-factors", "layers/dora.py",
        "state = None if torch.is_grad_enabled() else _state_key(self.lora_A[name], self.lora_B[name],",
        "state = None if torch.is_grad_enabled() else _state_key(",
        "the cached DoRA norm survives a change of the adapter's factors (stale in inference)",
        (T + "test_dora.py::test_the_norm_kept_for_inference_follows_changes_to_factors_and_base",),
    ),
    Mutant(
        "grouped-conv-b-ungrouped", "layers/conv.py",
        "return self.conv(t, B, self.scaled_lora_bias(name), 1, 0, 1, self.groups)",
        "return self.conv(t, B.repeat(1, self.groups, *(1,) * self.dims), self.scaled_lora_bias(name))",
        "a grouped convolution's B mixes every rank channel into every output (ignores the groups)",
        (T + "test_parity_grid.py::test_peft_save_loads_into_lorakit_with_the_same_output_and_counts",),
    ),
    Mutant(
        "lora-bias-unscaled", "layers/base.py",
        "return self.lora_bias[name] * self.scaling[name] if name in self.lora_bias else None",
        "return self.lora_bias[name] if name in self.lora_bias else None",
        "the lora bias is added without the adapter's scale alpha / r",
        (T + "test_lora_bias.py::test_lora_bias_adds_the_scaled_bias_and_merges_it_into_the_base_bias",),
    ),
    Mutant(
        "second-active-adapter-ignored", "layers/base.py",
        "            for name in self.also_active:  # set_adapter([a, b, ...]): the further adapters' outputs",
        "            for name in self.also_active[:0]:",
        "with several active adapters only the first one runs",
        (T + "test_active_adapters.py::test_active_adapters_sum_train_and_merge_together",),
    ),
    Mutant(
        "pissa-residual-not-subtracted", "layers/principal.py",
        "residual = W0 - s * (B0 @ A0)",
        "residual = W0",
        "PiSSA/OLoRA keep the full W0 as base, so the principal part counts twice",
        (T + "test_principal_init.py::test_principal_init_equals_peft_both_ways_and_delete_restores_w0",),
    ),
    Mutant(
        "loraplus-ratio-on-a", "loraplus.py",
        '"A": {"lr": lr, "weight_decay": weight_decay},',
        '"A": {"lr": lr * ratio, "weight_decay": weight_decay},',
        "LoRA+ gives A the raised learning rate too",
        (T + "test_loraplus.py::test_groups_give_every_parameter_peft_loraplus_learning_rate_and_decay",),
    ),
    Mutant(
        "merge-and-unload-skips-merge", "merging.py",
        "_merge_all([layer for _, layer in lora_layers(model) if not layer.merged_adapters])",
        "_merge_all([layer for _, layer in lora_layers(model) if layer.merged_adapters])",
        "merge_and_unload unwraps the layers without merging the active adapter",
        (T + "test_injection.py::test_merge_and_unload_gives_plain_model",),
    ),
    # ------------------------------------------------------------------ checkpoint I/O
    Mutant(
        "save-drops-bias-keys", "checkpoint.py",
        'tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}',
        'tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if not k.endswith(".bias")}',
        "save_adapter filters out the trained biases (bias='lora_only' / 'all'): the file lacks their keys",
        (T + "test_checkpoint.py::test_round_trip_into_plain_model_is_bit_identical",),
    ),
    Mutant(
        "load-transposes-factors", "checkpoint.py",
        "target.copy_(tensors[key])",
        "target.copy_(tensors[key].T if tensors[key].dim() == 2 else tensors[key])",
        "load_adapter transposes 2-D factors on the way in (as if every file stored [in, out])",
        (T + "test_checkpoint.py::test_round_trip_into_plain_model_is_bit_identical",),
    ),
    Mutant(
        "offline-layout-inverted", "offline.py",
        "return {p: p in recorded for p in shapes}, []",
        "return {p: p not in recorded for p in shapes}, []",
        "merge_files reads the recorded [in, out] layout list inverted: square ΔWs go in transposed",
        (T + "test_offline.py::test_merge_places_each_square_matrix_by_its_recorded_layout",),
    ),
    Mutant(
        "peft-embedding-keys", "layers/embedding.py",
        'peft_keys = ("lora_embedding_A", "lora_embedding_B")',
        'peft_keys = ("lora_A.weight", "lora_B.weight")',
        "embedding factors saved/loaded under the linear keys instead of PEFT's lora_embedding_A/B",
        (T + "test_peft_compat.py::test_peft_to_lorakit[llama-embedding]",
         T + "test_peft_compat.py::test_lorakit_to_peft[llama-embedding]"),
    ),
    Mutant(
        "peft-config-alpha-key", "config.py",
        '"lora_alpha": alpha,',
        '"alpha": alpha,',
        "adapter_config.json says 'alpha' instead of 'lora_alpha': lorakit reads it back, PEFT uses its default 8",
        (T + "test_peft_compat.py::test_lorakit_to_peft[mlp]",),
    ),
    Mutant(
        "peft-config-rank-pattern-lost", "config.py",
        'rank_pattern=peft_value(data, "rank_pattern", {}, (dict, type(None)), "an object {regex: rank}") or {},',
        "rank_pattern={},",
        "reading adapter_config.json drops rank_pattern (every module gets r)",
        (T + "test_config.py::test_peft_dict_round_trip",),
    ),
    # ------------------------------------------------------------------ routing and routed dropout
    Mutant(
        "route-every-row-row0", "routing.py",
        "rows = torch.tensor([position[n] if n is not None else len(order) for n in names])",
        "rows = torch.tensor([position[names[0]] if names[0] is not None else len(order) for n in names])",
        "every row of a routed batch runs row 0's adapter",
        (T + "test_routing.py::test_mixed_batch_equals_each_row_alone_all_layer_types",),
    ),
    Mutant(
        "slot-table-off-by-one", "routing.py",
        "slot = {n: i for i, n in enumerate(names)}",
        "slot = {n: i for i, n in enumerate(names, 1)}",
        "the slot table is off by one: each row gets the next adapter's bank slot (the last gets the zero slot)",
        (T + "test_routing.py::test_mixed_batch_equals_each_row_alone_all_layer_types",),
    ),
    Mutant(
        "bank-scale-not-folded", "bank.py",
        "b = [pad_rank(f * s, 1, rank) for f, s in zip(b_factors, scalings, strict=True)]",
        "b = [pad_rank(f, 1, rank) for f, s in zip(b_factors, scalings, strict=True)]",
        "the routing bank stacks B without folding in each adapter's scale s",
        (T + "test_routing.py::test_mixed_batch_equals_each_row_alone_all_layer_types",),
    ),
    Mutant(
        "routed-dropout-keep-is-p", "routing.py",
        "keep = (1.0 - p[slots]) if layer.training and self.has_dropout else None",
        "keep = p[slots] if layer.training and self.has_dropout else None",
        "a routed layer uses the dropout rate as the keep probability",
        (T + "test_routing.py::test_routed_training_drops_each_rows_adapter_inputs_at_its_own_rate",),
    ),
    # ------------------------------------------------------------------ trainer resume
    Mutant(
        "resume-rng-not-restored", "train_state.py",
        'torch.set_rng_state(state["rng"])',
        "torch.get_rng_state()",
        "resume does not restore the CPU RNG state (dropout masks after a resume differ)",
        (T + "test_trainer.py::test_resume_in_process_continues_bit_identically",),
    ),
    Mutant(
        "resume-trainable-copy-reversed", "train_state.py",
        "p.copy_(saved[n])",
        "saved[n].copy_(p)",
        "load_trainable copies the model into the loaded tensors instead of the other way round",
        (T + "test_trainer.py::test_model_without_adapter_resumes_its_trainable_parameters",),
    ),
    Mutant(
        "resume-metrics-off-by-one", "train_state.py",
        'record["step"] <= step',
        'record["step"] < step',
        "resume cuts metrics.jsonl one step too far (drops the checkpoint's own step)",
        (T + "test_trainer.py::test_damaged_checkpoint_is_skipped",),
    ),
    Mutant(
        "checkpoint-manifest-not-hashed", "train_state.py",
        "bad = [name for name, digest in sorted(listed.items()) if sha256_file(path / name) != digest]",
        "bad = [name for name, digest in sorted(listed.items()) if not (path / name).is_file()]",
        "a checkpoint's manifest is checked for presence only: a torn file is resumed from",
        (T + "test_trainer.py::test_damaged_checkpoint_is_skipped",),
    ),
    Mutant(
        "resume-optimizer-state-dropped", "distributed.py",
        'optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters\' device',
        "pass",
        "resume restores the weights but not AdamW's moments (the optimizer restarts cold)",
        (T + "test_trainer.py::test_resume_in_process_continues_bit_identically",),
    ),
    Mutant(
        "fsdp-resume-shards-not-written", "distributed.py",
        "    if write_back:",
        "    if False:",
        "an FSDP2 resume loads the adapter into gathered copies and never writes it back into the shards",
        (T + "test_parallel.py::test_data_parallel_resume_is_bit_identical[fsdp]",),
    ),
    Mutant(
        "gradients-not-all-reduced", "distributed.py",
        "    torch.distributed.all_reduce(flat)",
        "    pass",
        "plain data-parallel runs never all-reduce: each process trains on its own share of the batch",
        (T + "test_parallel.py::test_trainer_on_two_processes_equals_one_with_the_combined_batch[none-1]",),
    ),
    Mutant(
        "resume-oldest-checkpoint", "train_state.py",
        'for path in sorted(ckpt_dir.glob("step-*"), reverse=True):',
        'for path in sorted(ckpt_dir.glob("step-*")):',
        "checkpoints listed oldest first: resume continues from the oldest complete checkpoint, not the newest",
        (T + "test_trainer.py::test_damaged_checkpoint_is_skipped",),
    ),
    Mutant(
        "fingerprint-of-trainable", "train_state.py",
        "if p.requires_grad:\n            continue",
        "if not p.requires_grad:\n            continue",
        "the base fingerprint hashes the trainable parameters instead of the frozen base: every resume is refused",
        (T + "test_trainer.py::test_resume_in_process_continues_bit_identically",),
    ),
    # ------------------------------------------------------------------ quantization
    Mutant(
        "nf4-code-table-fp16", "quantization.py",
        'self.register_buffer("code", state.code.float())',
        'self.register_buffer("code", state.code.half().float())',
        "the NF4 code table is kept in fp16: its entries are rounded",
        (T + "test_quantization.py::test_our_dequantization_matches_bitsandbytes_on_whole_blocks",),
    ),
    Mutant(
        "nf4-blocksize-128", "quantization.py",
        "blocksize: int = 64,",
        "blocksize: int = 128,",
        "NF4 blocks of 128 weights instead of 64 (4.06 bits per weight, worse error)",
        (T + "test_quantization.py::test_bits_per_weight_of_a_4096_square_layer",),
    ),
    Mutant(
        "nf4-double-quant-scale", "quantization.py",
        "return self.code2[self.absmax.long()] * level2 + self.offset",
        "return self.code2[self.absmax.long()] + self.offset",
        "double quantization: the second-level absmax scale is not applied to the 8-bit absmax codes",
        (T + "test_quantization.py::test_our_dequantization_matches_bitsandbytes_on_whole_blocks",),
    ),
    # ------------------------------------------------------------------ parameters, tokens, attention
    Mutant(
        "expert-factors-expert-major-b", "layers/parameter.py",
        "B_e = B.reshape(B.shape[0], r, experts).permute(2, 0, 1)  # [E, out, r]",
        "B_e = B.reshape(B.shape[0], experts, r).permute(1, 0, 2)  # [E, out, r]",
        "B's columns read expert-major instead of PEFT's rank-major layout",
        (T + "test_target_parameters.py::test_the_module_computes_with_w_plus_delta_written_out_by_hand",),
    ),
    Mutant(
        "parameter-nesting-reversed", "layers/parameter_plan.py",
        "chain.insert(0, inner)",
        "chain.append(inner)",
        "nested parameter wrappers get each other's paths (the first registered is not innermost)",
        (T + "test_target_parameters.py::test_wrappers_nest_in_registration_order_and_a_second_adapter_reuses_them",),
    ),
    Mutant(
        "tokens-miss-repeated-rows", "layers/trainable_tokens.py",
        "return torch.where((where >= 0)[..., None], values[where.clamp(min=0)].to(out.dtype), out)",
        "return torch.where((where > 0)[..., None], values[where.clamp(min=0)].to(out.dtype), out)",
        "the first trainable token reads the frozen row",
        (T + "test_trainable_tokens.py::test_only_the_chosen_rows_train_and_the_output_reads_them",),
    ),
    Mutant(
        "mha-out-proj-not-adapted", "layers/attention.py",
        'swapped = {"in_proj_weight": self.effective_weight(names), "out_proj.weight": self.out_effective(names)}',
        'swapped = {"in_proj_weight": self.effective_weight(names)}',
        "the MultiheadAttention adapter leaves out_proj at W0 (its factors train for nothing)",
        (T + "test_multihead_attention.py::test_the_attention_runs_with_both_adapted_weights",),
    ),
    # ------------------------------------------------------------------ combine and planner
    Mutant(
        "svd-truncation-off-by-one", "combine.py",
        "r = min(rank, S.numel())",
        "r = min(rank, S.numel()) - 1",
        "svd/ties/dare keep one singular value fewer than the rank asked for",
        (T + "test_combine.py::test_truncated_svd_error_is_the_tail_energy",),
    ),
    Mutant(
        "planner-gqa-ignored", "planner.py",
        '"k_proj": (h, kv * hd), "v_proj": (h, kv * hd)',
        '"k_proj": (h, heads * hd), "v_proj": (h, heads * hd)',
        "the planner counts k/v projections with num_attention_heads instead of num_key_value_heads",
        (T + "test_planner.py::test_llama_3_1_8b_layer_and_full_finetune_arithmetic",),
    ),
    Mutant(
        "planner-adapter-no-gradient", "planner.py",
        "adapter = 16.0 * n_adapter",
        "adapter = 12.0 * n_adapter",
        "LoRA adapter bytes forget the fp32 gradient (weight + two moments only)",
        (T + "test_mutation_gaps.py::test_planner_adapter_bytes_match_a_real_lora_training_step",),
    ),
    Mutant(
        "planner-nf4-dq-bytes", "planner.py",
        '"nf4-dq": (4 + 8 / 64 + 32 / (64 * 256)) / 8,',
        '"nf4-dq": (4 + 8 / 64 + 32 / 256) / 8,',
        "the planner's NF4+DQ size counts a 32-bit second-level absmax per 256 weights, not per 256 blocks",
        (T + "test_mutation_gaps.py::test_planner_nf4_dq_bytes_equal_what_quantize_stores",),
    ),
)  # fmt: skip
