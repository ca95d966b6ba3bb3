"""`lorakit study`: how many parameters a fine-tuning needs, measured on the user's model and data.

The notes rest LoRA on two claims: that fine-tuning needs far fewer free parameters than the model has
(Aghajanyan et al. 2020), and that pre-trained weights are redundant. The modules measure both, each on its own:

- fastfood: random projections θ_d ↦ P θ_d, the Fastfood transform (O(D) memory) and the dense Gaussian reference;
- intrinsic: training in a random subspace (DID and SAID) and d90, the intrinsic dimension (`lk.intrinsic_dimension`);
- widths: Li et al.'s finding that d90 barely depends on the network's width, on the digits;
- recipe: the one way every run trains; tasks: the digits and text fine-tunings a study runs;
- ranks: LoRA at ranks 1 … 64, and the amplification of W by ΔW (the LoRA paper's section 7);
- truncation: the model's metric with each weight cut to rank k;
- points, experiment, report: the resumable command, study.json, the plots and report.html;
- settings: the command's flags (imported by the command line without torch, hence nothing is imported here).
"""

__all__: list[str] = []  # the modules are imported by name: `from lorakit.study.intrinsic import ...`
