"""helios_rt.compile"""
