# hbfp_accel: the hbfp-hw UART accelerator, design clock 50 MHz, UART 3000000 baud
create_clock -name clk -period 20.000 [get_ports {clk}]
# asynchronous inputs (the UART receiver synchronises rx)
set_false_path -from [get_ports {rx rst}]
# asynchronous outputs (UART transmitter, status LEDs)
set_false_path -to [get_ports {tx busy}]
# pins (Quartus .qsf syntax; other tools: their own)
# set_location_assignment PIN_<pin> -to clk
# set_location_assignment PIN_<pin> -to rst
# set_location_assignment PIN_<pin> -to rx
# set_location_assignment PIN_<pin> -to tx
# set_location_assignment PIN_<pin> -to busy
