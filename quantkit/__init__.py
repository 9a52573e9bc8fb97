"""quantkit: turn a Hugging Face LLM into published ExLlamaV2 (EXL2) quants with an honest VRAM plan."""

__version__ = "0.1.0"

#: The exllamav2 release whose converter, allocation rules and architecture list quantkit models.
EXLLAMAV2_VERSION = "0.3.2"
