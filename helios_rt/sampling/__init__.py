"""helios_rt.sampling"""
