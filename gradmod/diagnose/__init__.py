"""tmp"""
from gradmod.diagnose.monitor import Monitor
