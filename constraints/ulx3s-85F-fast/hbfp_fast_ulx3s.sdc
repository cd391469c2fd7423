# hbfp_fast_ulx3s: the hbfp-hw board top for ulx3s 85F; ports and pins as in hbfp_fast_ulx3s.lpf
create_clock -name clk25_0__io -period 40.000 [get_ports {clk25_0__io}]
# the design clock, from the PLL (45.000 MHz)
create_clock -name design_clk -period 22.222 [get_nets {clk$6}]
# the MAC array's clock, PLL CLKOS (45.000 MHz): crosses to the design clock in asynchronous FIFOs only
create_clock -name array_clk -period 22.222 [get_nets {array_clk$8}]
set_clock_groups -asynchronous -group {design_clk} -group {array_clk}
# asynchronous inputs (the UART receiver synchronises rx)
set_false_path -from [get_ports {uart_0__rx__io}]
# asynchronous outputs (UART transmitter, status LEDs)
set_false_path -to [get_ports {led_0__io led_1__io uart_0__tx__io}]
