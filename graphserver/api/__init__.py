"""The HTTP front end (DESIGN §9.1): OpenAI-compatible routes in front of the engine's ZeroMQ RPCs.

A package inside graphserver (not top-level) because it shares graphserver.protocol with the engine
and ships in the same distribution; it is torch-free, so importing it never imports torch.

Modules: schemas (pydantic types), text (tokenizer, chat template, detokenizer; stop strings are
graphserver.stops, shared with the CLI client),
params (request -> engine params), service (engine link and one request's text stream), metrics,
app (FastAPI routes), server (`graphserver serve`), workers (its --api-servers processes)."""
