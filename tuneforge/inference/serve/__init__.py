"""The OpenAI-compatible server (`tuneforge serve`): FastAPI app over the continuous-batching engine.

    tuneforge serve --model builtin:smollm2-135m-instruct --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Modules: main.py (the verb, its options, a server thread for tests), app.py (routes, auth and size limits, errors),
protocol.py (request bodies, OpenAI's error shape), chat.py (messages and tool_choice), completions.py (requests
-> engine handles -> responses), streaming.py (server-sent events), tools.py (tool-call parsing per template
family), models.py (base model + named adapters, checked at load), vllm.py (`--backend vllm`).
"""
