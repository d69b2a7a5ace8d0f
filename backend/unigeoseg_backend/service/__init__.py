"""The ZeroMQ service: a ROUTER front end and one worker thread that owns the models."""
