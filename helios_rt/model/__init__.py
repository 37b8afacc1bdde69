"""helios_rt.model"""
