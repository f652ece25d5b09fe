"""edgeslice MQTT layer: wire protocol, broker connection, local broker, monitor and CLI."""
