"""Measuring each branch against the unquantized model: perplexity, KL divergence, top-1 agreement.

`core` (the work folder's evaluation and its cache), `text` (the held-out text), `worker` / `forward` /
`metrics` (the subprocess that holds torch and exllamav2), `chart` (the SVG), `card` (the card's columns).
"""

#: In the work folder and on the published `main` branch.
REPORT_NAME = "eval.json"
CHART_NAME = "eval.svg"
