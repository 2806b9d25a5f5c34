"""The browser control surface (`live --web [PORT]`): protocol (JSON messages to the
control state, scenes and queries), access (bind address, Origin, Host and token
checks), server (aiohttp: the page and one WebSocket, in its own thread) and the static
page (plain HTML, JS and CSS). docs/web.md documents the protocol."""
