"""The imtext Kubeflow pipeline: the DAG, its cluster settings, compile, local run and submit.

Imports kfp and ``components``, never imtext or torch; ``imtext pipeline ...`` loads it with
importlib (see README.md here).
"""
