"""``python -m llm_router.client.wire``: regenerate the shipped JSON Schemas."""

from llm_router.client.wire import main

raise SystemExit(main())
