"""culign: cultural alignment of a frozen LLM with soft prompts tuned by Differential Evolution."""
__version__ = "0.1.0"
