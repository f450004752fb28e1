import os

# No test touches the network: the hub is offline, and the profile is the CPU one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LDM_TEACH_PROFILE", "quick")
