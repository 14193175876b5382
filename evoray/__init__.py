"""evoray: targeted LLM adaptation with little data (EvoSelect generate → select → train) on Ray.

Sub-packages: ``evoray.data`` (records, files, tokenization, the features format),
``evoray.models``, ``evoray.tasks`` (built-in tasks and the simulated generator),
``evoray.features`` (per-sample LoRA-gradient features on Ray Data), ``evoray.select`` (EvoSelect
and baselines, no Ray), ``evoray.train`` (Ray Train LoRA fine-tuning, evaluation, export) and
``evoray.config``.
"""

__version__ = "0.1.0"
