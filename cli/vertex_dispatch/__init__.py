"""vertex-dispatch: the command-line client of vertex-dispatcher's ingress.

Three commands (``vertex-dispatch COMMAND --help`` for each):

- ``submit PROMPT``: one job, a spinner while it runs, then the response text.
- ``status JOB_ID``: the job's view as JSON.
- ``batch INPUT.jsonl``: one job per ``{"request": GenerateContentRequest}`` line, the input
  format of Vertex batch prediction
  (https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-gemini),
  with a progress bar; results are written as JSONL in input order and a re-run resumes.

A distribution of its own (``vertex-dispatcher-cli``): it talks to the ingress over HTTP only,
with httpx and tqdm, and imports nothing of the services (no Google client library).

Modules, in the order a command goes through them: ``__main__`` (the entry point),
``commands`` (the command line), ``job`` (``submit`` and ``status``), ``batch_run`` (``batch``),
``batch`` (its input, journal and output files), ``client`` (the ingress's HTTP API and its
retries), ``progress`` (the bar and the spinner), ``report`` (durations, tables, the summary),
``errors``.
"""

from typing import Final

PROG: Final = "vertex-dispatch"
"""The command's name, in messages and in the ``User-Agent``."""
