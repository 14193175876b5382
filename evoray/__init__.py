"""evoray: targeted LLM adaptation with little data (EvoSelect generate → select → train) on Ray.

Stages live in sub-packages: ``evoray.data`` (records, files, tokenization), ``evoray.models``,
``evoray.tasks`` (built-in tasks and the simulated generator) and ``evoray.config``.
"""

__version__ = "0.1.0"
