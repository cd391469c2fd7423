# hbfp_ice_icebreaker: the hbfp-hw board top for icebreaker UP5K; ports and pins as in hbfp_ice_icebreaker.pcf
create_clock -name clk12_0__io -period 83.333 [get_ports {clk12_0__io}]
# asynchronous inputs (the UART receiver synchronises rx)
set_false_path -from [get_ports {uart_0__rx__io}]
# asynchronous outputs (UART transmitter, status LEDs)
set_false_path -to [get_ports {led_0__io led_1__io uart_0__tx__io}]
