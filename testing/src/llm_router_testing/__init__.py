"""llm-router's testing kit, used by the tests, the benchmarks and the demo.

Never published and never installed on a worker: stub servers that speak Ollama's,
Anthropic's and the OpenAI API's wire formats and fail as those services do
(:mod:`~llm_router_testing.stubs`), private Redis servers with TLS or Sentinel
(:mod:`~llm_router_testing.servers`), the catalogue of hostile requests and answers
(:mod:`~llm_router_testing.hostile`), real tokenizers for the token estimate
(:mod:`~llm_router_testing.tokenizers`) and the end-to-end demo
(:mod:`~llm_router_testing.demo`).
"""
