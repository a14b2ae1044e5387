"""Sandboxes that run build steps: ``process`` everywhere, ``docker`` where an engine answers.

base.py: the Sandbox protocol and steps; process.py, docker.py: the two sandboxes;
docker_engine.py: the engine client and its checks; docker_session.py: one container per phase.
"""
